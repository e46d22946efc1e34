"""The compiled wheel (csrc/build_wheels.sh): what it holds, that installing it needs no compiler, and that the
extension loads and says what it was built for. Runs where this Python has a CUDA build of torch and nvcc (a CUDA
torch imports without a GPU); skipped with the reason elsewhere, in about no time.

GRPO_GUARD_WHEEL_ARCHS overrides the architectures built (default: the shipped "80;90;100"). With
GRPO_GUARD_OTHER_TORCH_PYTHON=<python with another torch> the same wheel is also installed for that Python, where
the extension must degrade to one line naming both builds.
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_home():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _cuobjdump():
    """The toolkit's cuobjdump, else one on PATH, else the copy Triton ships (triton/backends/nvidia/bin)."""
    found = [os.path.join(_cuda_home(), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((p for p in found if p and os.path.exists(p)), None)


def _requirements():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (the wheel is built against this Python's torch)"
    if _cuda_home() is None:
        return "nvcc not found (CUDA_HOME or /usr/local/cuda)"
    for mod in ("setuptools", "wheel", "ninja"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed in this Python"
    return None


pytestmark = pytest.mark.skipif(_requirements() is not None, reason=str(_requirements()))


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    archs = os.environ.get("GRPO_GUARD_WHEEL_ARCHS", "80;90;100")
    env = dict(os.environ, PYTHON=sys.executable, CUDA_HOME=_cuda_home(), GRPO_GUARD_CUDA_ARCHS=archs)
    _run(["bash", os.path.join(ROOT, "csrc", "build_wheels.sh"), str(out)], env=env, cwd=ROOT, timeout=3600)
    plat = glob.glob(str(out / "grpo_guard-*-cp*.whl"))
    pure = glob.glob(str(out / "grpo_guard-*-py3-none-any.whl"))
    assert len(plat) == 1 and len(pure) == 1, os.listdir(out)
    return plat[0], pure[0], archs.split(";")


def test_wheel_names_and_contents(wheels):
    plat, pure, archs = wheels
    label = f"+cu{torch.version.cuda.replace('.', '')}torch{'.'.join(torch.__version__.split('.')[:2])}"
    assert label in os.path.basename(plat), plat
    assert "+" not in os.path.basename(pure)
    for whl, has_ext in ((plat, True), (pure, False)):
        names = zipfile.ZipFile(whl).namelist()
        assert "grpo_guard/kernels/policy_loss.py" in names and "grpo_guard/kernels/sde_step.py" in names
        assert any(n.startswith("grpo_guard/demo/assets/") and n.endswith(".safetensors") for n in names)
        assert not any(n.startswith(("tests/", "benchmarks/", "csrc/", "kernels/")) for n in names), names
        assert any(n.startswith("grpo_guard/_C") and n.endswith(".so") for n in names) is has_ext
        assert ("grpo_guard/_C_build.json" in names) is has_ext


def test_the_extension_holds_a_cubin_per_architecture_and_the_ptx(wheels, tmp_path):
    plat, _, archs = wheels
    z = zipfile.ZipFile(plat)
    so = next(n for n in z.namelist() if n.startswith("grpo_guard/_C") and n.endswith(".so"))
    path = z.extract(so, tmp_path)
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin, PATH, or the one Triton ships)")
    elf = _run([cuobjdump, "--list-elf", path])
    ptx = _run([cuobjdump, "--list-ptx", path])
    for a in archs:
        assert f"sm_{a}" in elf, elf
    assert f"sm_{archs[-1]}" in ptx or f"compute_{archs[-1]}" in ptx, ptx


def _install(whl, target, python=sys.executable):
    """pip install --no-deps into a fresh folder (no compiler, no network), as a user would into a clean env."""
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--target",
          str(target), whl], timeout=600)
    return dict(os.environ, PYTHONPATH=str(target), PATH=f"{target}/bin:{os.environ['PATH']}")


def test_installed_wheel_imports_the_extension_and_reports_its_build(wheels, tmp_path):
    plat, _, archs = wheels
    env = _install(plat, tmp_path / "site")
    env.pop("CUDA_HOME", None)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not os.path.exists(os.path.join(p, "nvcc")))
    code = "import grpo_guard, grpo_guard._C as c; print(grpo_guard.__file__); print(c.__file__)"
    out = _run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert all(line.startswith(str(tmp_path / "site")) for line in out.split()), out  # not the repository's
    info = _run([sys.executable, "-m", "grpo_guard.cli", "info", "--no-check"], env=env, cwd=tmp_path)
    want = ("cuda extension: grpo_guard._C loaded, built for torch "
            f"{'.'.join(torch.__version__.split('.')[:2])} / cu{torch.version.cuda.replace('.', '')}, "
            + ", ".join(f"sm_{a}" for a in archs) + f" + PTX compute_{archs[-1]}")
    assert want in info, info


def test_the_universal_wheel_runs_without_the_extension(wheels, tmp_path):
    _, pure, _ = wheels
    env = _install(pure, tmp_path / "site")
    info = _run([sys.executable, "-m", "grpo_guard.cli", "info", "--no-check"], env=env, cwd=tmp_path)
    assert "grpo_guard._C is not built (the pure-Python install)" in info, info
    assert "cpu  torch  available" in info


@pytest.mark.skipif(not os.environ.get("GRPO_GUARD_OTHER_TORCH_PYTHON"),
                    reason="GRPO_GUARD_OTHER_TORCH_PYTHON (a Python with another torch) is not set")
def test_a_wheel_for_another_torch_degrades_to_one_line(wheels, tmp_path):
    plat, _, _ = wheels
    other = os.environ["GRPO_GUARD_OTHER_TORCH_PYTHON"]
    other_torch = _run([other, "-c", "import torch; print(torch.__version__)"]).strip()
    env = _install(plat, tmp_path / "site", python=other)
    info = _run([other, "-m", "grpo_guard.cli", "info", "--no-check"], env=env, cwd=tmp_path)
    line = next(x for x in info.splitlines() if x.startswith("cuda extension:"))
    assert "not loaded: grpo_guard._C built for torch " in line and f"running torch {other_torch}" in line, info
    # without its build record, the loader tries the import and reports the loader's own error in one line
    os.remove(tmp_path / "site" / "grpo_guard" / "_C_build.json")
    info = _run([other, "-m", "grpo_guard.cli", "info", "--no-check"], env=env, cwd=tmp_path)
    line = next(x for x in info.splitlines() if x.startswith("cuda extension:"))
    assert "does not load: ImportError" in line or "does not load: OSError" in line, info
    assert "cpu  torch  available" in info
    shutil.rmtree(tmp_path / "site")
