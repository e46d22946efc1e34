"""The benchmark suite ships with the package (grpo_guard/bench/): ``grpo-guard bench`` runs from an installation
without the repository, the package never imports the repository's folders (benchmarks/, tests/), and the
checkout's benchmarks/ scripts and the commands written in benchmarks/*.sh and RESULTS.md still name files that
exist."""
import ast
import csv
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grpo_guard"

# a tiny CPU run: both ops, one dtype, two modes, eager vs gg-torch, 3 timed calls each
TINY = ["bench", "--device", "cpu", "--shapes", "cpu_small", "--dtypes", "fp32", "--modes", "forward,full",
        "--rep", "3"]

# run in a fresh interpreter whose cwd is a temporary folder: imports of the repository's folders are refused, and
# afterwards no loaded module may come from them (grpo_guard itself comes from wherever it is installed)
_ISOLATED = """
import importlib.abc, os, sys
ROOT = {root!r}
BLOCKED = ("benchmarks", "_cases", "tests", "conftest")

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the package imported {{name!r}} from the repository")
        return None

sys.meta_path.insert(0, Refuse())
assert not any(p and os.path.realpath(p) == os.path.realpath(ROOT) for p in sys.path), sys.path
from grpo_guard.cli import main
rc = main({argv!r})
outside = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)
           and os.path.realpath(m.__file__).startswith(tuple(os.path.join(os.path.realpath(ROOT), d) + os.sep
                                                            for d in ("benchmarks", "tests")))]
assert not outside, outside
import grpo_guard
print("GRPO_GUARD_FILE", grpo_guard.__file__)
sys.exit(rc)
"""


def _run_isolated(argv, cwd, env):
    code = _ISOLATED.format(root=str(ROOT), argv=list(argv))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _check_tiny_run(proc, out_csv):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == {
        (op, mode, p) for op in ("sde_step", "policy_loss") for mode in ("forward", "full")
        for p in ("eager", "gg-torch")}
    assert all(r["median_ms"] and float(r["median_ms"]) > 0 and not r["note"] for r in rows), rows
    assert "copy bandwidth" in proc.stdout and "vs eager" in proc.stdout


def test_grpo_guard_bench_runs_from_the_package_without_the_repository(tmp_path):
    out = tmp_path / "r.csv"
    proc = _run_isolated(TINY + ["--out", str(out)], cwd=tmp_path, env=_clean_env())
    _check_tiny_run(proc, out)


def test_the_package_never_imports_the_repository_folders():
    """No module of grpo_guard imports benchmarks/ or tests/ (or their modules) or edits sys.path."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in ("benchmarks", "tests", "_cases", "_oracle")]
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses sys.path")
    assert not bad, bad


def test_setup_ships_the_bench_subpackage():
    from setuptools import find_packages
    assert "grpo_guard.bench" in find_packages(str(ROOT), include=["grpo_guard", "grpo_guard.*"])


def _write_rows(path, graph_ms, copy_graph_ms=None):
    from grpo_guard.bench.timing import Row, write_csv
    rows = [Row("sde_step", "forward", "gg-triton", "sd35_512", 9, 65536, "bfloat16", "cuda:0", median_ms=0.02,
                p20_ms=0.02, p80_ms=0.03, bytes_moved=10 ** 7, gbps=500.0, pct_of_copy=12.5, graph_ms=graph_ms,
                graph_gbps=10 ** 7 / (graph_ms * 1e-3) / 1e9, copy_graph_ms=copy_graph_ms)]
    write_csv(rows, path, {"device": "test"}, 4000.0)


def test_bench_cli_reads_previous_runs(tmp_path, capsys):
    from grpo_guard.bench.cli import main
    _write_rows(tmp_path / "a.csv", 0.010)  # an older CSV: no same-size copy time
    _write_rows(tmp_path / "b.csv", 0.008, copy_graph_ms=0.004)
    assert main(["--compare-from", f"split={tmp_path / 'a.csv'}", f"fused={tmp_path / 'b.csv'}"]) == 0
    out = capsys.readouterr().out
    assert "split: GPU us" in out and "| sde_step | forward | sd35_512 | bfloat16 | 10.0 |" in out
    assert out.strip().endswith("| 0.80 | 4.0 |")  # last / first, the same-size copy's GPU us
    assert main(["--markdown-from", str(tmp_path / "a.csv")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert "| sde_step | forward | sd35_512 | bfloat16 | gg-triton | 20.0 |" in table[-1]
    assert table[0].count("|") == table[-1].count("|") and table[-1].endswith("| n/a | n/a |")  # no copy, host time
    assert main(["--markdown-from", str(tmp_path / "b.csv")]) == 0
    assert "| 1250 | 50 | n/a |" in capsys.readouterr().out  # GPU GB/s, 100 x 4 us copy / 8 us op, host us


def test_bench_cli_splits_forward_and_backward_passes(tmp_path, capsys):
    """--passes-from: the backward pass is full - forward (GPU time and bytes), each pass's GB/s and % of the run's
    copy bandwidth; --provider filters; a CSV without a copy bandwidth is refused."""
    from grpo_guard.bench.cli import main
    from grpo_guard.bench.timing import Row, write_csv
    rows = [Row("policy_loss", mode, prov, "wan_480p", 2, 10 ** 6, "bfloat16", "cuda:0", median_ms=1.0, p20_ms=1.0,
                p80_ms=1.0, bytes_moved=nbytes, graph_ms=ms)
            for prov in ("gg-triton", "gg-cuda")
            for mode, nbytes, ms in (("forward", 8 * 10 ** 6, 0.004), ("full", 18 * 10 ** 6, 0.009))]
    write_csv(rows, tmp_path / "r.csv", {"device": "test"}, 4000.0)
    assert main(["--passes-from", str(tmp_path / "r.csv"), "--provider", "gg-cuda"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # forward 8 MB in 4 us = 2000 GB/s = 50 % of 4000; backward 10 MB in 5 us = 2000 GB/s
    assert lines[-1] == "| policy_loss | wan_480p | bfloat16 | gg-cuda | 4.0 | 2000 | 50 | 5.0 | 2000 | 50 |"
    assert len(lines) == 3
    write_csv(rows, tmp_path / "cpu.csv", {"device": "test"}, None)
    with pytest.raises(SystemExit, match="no copy bandwidth"):
        main(["--passes-from", str(tmp_path / "cpu.csv")])


def test_bench_cli_runs_the_other_tools(tmp_path, capsys):
    from grpo_guard.bench.cli import TOOLS, main
    (tmp_path / "h.csv").write_text("backend,op,sigmas,host_us\ntorch,policy_loss fwd,float,120.0\n"
                                    "torch,policy_loss fwd,tensor,150.0\n")
    assert main(["host_overhead", "--table", str(tmp_path / "h.csv")]) == 0
    assert "| torch | policy_loss fwd | 120 | 150 |" in capsys.readouterr().out
    for tool, (module, _) in TOOLS.items():  # every tool module exists and has main(argv)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an optional dependency (the trainer's diffusers), not the module
            if (exc.name or "").startswith("grpo_guard"):
                raise
            continue
        with pytest.raises(SystemExit) as exc:
            main([tool.replace("_", "-"), "--help"])
        assert exc.value.code == 0
        assert f"usage: grpo-guard bench {tool}" in capsys.readouterr().out


def test_grpo_guard_cli_routes_bench():
    from grpo_guard.cli import SUBCOMMANDS
    module = importlib.import_module(SUBCOMMANDS["bench"][0])
    assert module.__name__.startswith("grpo_guard.bench") and callable(module.main)


BENCH = ROOT / "benchmarks"


@pytest.mark.skipif(not BENCH.is_dir(), reason="no benchmarks/ folder (not a checkout)")
def test_checkout_commands_name_existing_scripts():
    """Every `python benchmarks/X.py` / `python -m benchmarks.X` in the scripts and RESULTS.md names a file of
    benchmarks/, and every script there except run_gpu.py is a thin shim over an existing grpo_guard.bench module."""
    text = "\n".join(p.read_text() for p in [*BENCH.glob("*.sh"), BENCH / "RESULTS.md"] if p.is_file())
    named = set(re.findall(r"benchmarks/(\w+)\.py", text)) | set(re.findall(r"-m benchmarks\.(\w+)", text))
    assert named, "no commands found"
    missing = sorted(n for n in named if not (BENCH / f"{n}.py").is_file())
    assert not missing, missing
    for path in BENCH.glob("*.py"):
        if path.name in ("__init__.py", "test_bench_cpu.py"):
            continue
        tree = ast.parse(path.read_text())
        sources = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert any(s.startswith("grpo_guard.bench.") for s in sources), path
        for s in sources:
            assert not s.startswith("benchmarks"), (path, s)
            if s.startswith("grpo_guard.bench."):
                assert (PACKAGE / "bench" / (s.split(".")[-1] + ".py")).is_file(), (path, s)


@pytest.mark.skipif(not BENCH.is_dir(), reason="no benchmarks/ folder (not a checkout)")
def test_checkout_shim_runs_the_package_suite(tmp_path):
    """`python benchmarks/suite.py --markdown-from CSV` (a file run, from another directory) prints the table."""
    _write_rows(tmp_path / "a.csv", 0.010)
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--markdown-from", str(tmp_path / "a.csv")],
                          cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sde_step | forward | sd35_512 | bfloat16 | gg-triton |" in proc.stdout


@pytest.mark.slow
def test_grpo_guard_bench_runs_from_an_installed_wheel(tmp_path):
    """A pure wheel (no CUDA extension) built from this tree and installed into a folder of its own runs the
    suite with the repository out of reach."""
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"cannot build a wheel here: {exc}")
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_C_build.json", "*.egg-info")
    for d in ("grpo_guard", "kernels"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / f).is_file():
            shutil.copy(ROOT / f, src / f)
    env = _clean_env(GRPO_GUARD_BUILD_CUDA="0")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("grpo_guard-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                           str(whl)], env=env, capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    assert (site / "grpo_guard" / "bench" / "suite.py").is_file()
    run = tmp_path / "run"
    run.mkdir()
    out = run / "r.csv"
    proc = _run_isolated(TINY + ["--out", str(out)], cwd=run, env=_clean_env(PYTHONPATH=str(site)))
    _check_tiny_run(proc, out)
    assert f"GRPO_GUARD_FILE {site}" in proc.stdout, proc.stdout[-500:]


def test_host_overhead_against_an_older_checkout(tmp_path, capsys):
    """``--against``: both sides run (alternately, in fresh processes, each importing its own package and kernels:
    checked by the tool) and each writes its per-case minimum; a checkout without grpo_guard is refused instead of
    silently timing the installed one twice."""
    from grpo_guard.bench.host_overhead import main
    old = tmp_path / "old"
    for folder in ("grpo_guard", "kernels"):  # a checkout's layout: kernels/ becomes grpo_guard.kernels
        shutil.copytree(ROOT / folder, old / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    assert main(["--against", str(old), "--rounds", "2", "--rep", "2", "--backends", "torch", "--device", "cpu",
                 "--csv-pair", str(before), str(after)]) == 0
    for path in (before, after):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {(r["op"], r["sigmas"]) for r in rows} == {(op, s) for op in ("sde_step rollout",
                                                                            "sde_step score fwd+bwd",
                                                                            "policy_loss fwd", "policy_loss fwd+bwd")
                                                          for s in ("float", "tensor")}
        assert all(r["backend"] == "torch" and float(r["host_us"]) > 0 for r in rows)
    assert "| torch | policy_loss fwd | tensor |" in capsys.readouterr().out
    if importlib.util.find_spec("triton") is not None:  # (the kernels import Triton)
        shutil.rmtree(old / "kernels")  # its grpo_guard.kernels would come from this checkout's install: refused
        with pytest.raises(RuntimeError, match=r"the before run imported grpo_guard from .*kernels"):
            main(["--against", str(old), "--rounds", "1", "--rep", "1", "--backends", "torch", "--device", "cpu",
                  "--csv-pair", str(before), str(after)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="has no grpo_guard package"):
        main(["--against", str(tmp_path / "empty"), "--rounds", "1", "--rep", "1", "--backends", "torch",
              "--device", "cpu", "--csv-pair", str(before), str(after)])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_host_overhead_no_launch_times_the_triton_wrapper(tmp_path):
    """``--no-launch`` (CPU, TRITON_INTERPRET=1): the triton backend's wrapper with every kernel launch a no-op,
    labelled triton-nolaunch; without the interpreter setting it refuses (the kernels would be compiled ones)."""
    out = tmp_path / "h.csv"
    argv = [sys.executable, "-m", "grpo_guard.bench.host_overhead", "--device", "cpu", "--backends", "triton",
            "--no-launch", "--rep", "2", "--csv", str(out)]
    proc = subprocess.run(argv, cwd=tmp_path, env=_clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(r["backend"] == "triton-nolaunch" and float(r["host_us"]) > 0 for r in rows)
    env = {k: v for k, v in _clean_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
