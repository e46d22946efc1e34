"""Host time per call of the public ops with the default validation, at a tiny shape (the kernels' own time is
negligible, so this is what a training loop's thread pays to issue them: Python, checks, dispatch, launches and any
host synchronization). Sigmas as Python floats and as float64 device tensors; forward, and forward + backward.

    python -m grpo_guard.bench.host_overhead [--device cuda] [--backends torch,triton,cuda] [--rep 100] \
        [--csv out.csv]
    python -m grpo_guard.bench.host_overhead --compare before.csv after.csv   # a Markdown table of two runs
    python -m grpo_guard.bench.host_overhead --table run.csv                  # a Markdown table of one run
    python -m grpo_guard.bench.host_overhead --profile "policy_loss fwd" --backends triton   # where the time goes
    python -m grpo_guard.bench.host_overhead --against OLD_CHECKOUT --rounds 5 --csv-pair before.csv after.csv
        # an older checkout and this one, run alternately (each round one run of each, in fresh processes); per
        # case the minimum over all rounds: a shared machine's slow phases hit both alike
    TRITON_INTERPRET=1 python -m grpo_guard.bench.host_overhead --device cpu --backends triton --no-launch
        # the Triton wrapper's own host work on a CPU (backend "triton-nolaunch"): every kernel launch is a no-op,
        # so what is timed is the Python of the wrapper (checks, geometry, allocations, autograd), not Triton's
        # launcher nor a kernel; with --against too

(``grpo-guard bench host_overhead ...``, and from a checkout ``python benchmarks/host_overhead.py ...``, the same.)

Uses only the API every version since 0.1 has (sde_step, policy_loss with old_model_output), so the same code
measures an older checkout for comparison (copy this file there: it needs only ``grpo_guard``). The minimum over
7 repeats of the mean time of ``--rep`` back-to-back calls (the device is synchronized before each repeat, not
between calls: at this size the device never holds the host back), after a warm-up; one torch thread on a CPU. The
minimum, not the median: a shared machine's noise only ever adds time.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

import grpo_guard as gg


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(fn, device, rep, repeats=7):
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(rep):
            fn()
        best = min(best, (time.perf_counter() - t0) / rep * 1e6)
    _sync(device)
    return best


class _NoLaunch:
    """A Triton kernel stand-in whose launch ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches() -> None:
    """Replace every ``*_kernel`` of grpo_guard.kernels' sde_step and policy_loss modules (the wrappers launch them
    through the module) by :class:`_NoLaunch`: outputs stay uninitialized, the wrapper's host work is all that runs."""
    from grpo_guard.kernels import policy_loss, sde_step
    for mod in (sde_step, policy_loss):
        for name in [n for n in dir(mod) if n.endswith("_kernel")]:
            setattr(mod, name, _NoLaunch())


def cases(device):
    B = 2
    v = torch.randn(B, 4, 8, 8, device=device)
    x = torch.randn(B, 4, 8, 8, device=device)
    noise = torch.randn(B, 4, 8, 8, device=device)
    xp = x + 0.1 * noise
    adv = torch.randn(B, device=device)
    sig_t = torch.full((B,), 0.7, dtype=torch.float64, device=device)
    nxt_t = torch.full((B,), 0.6, dtype=torch.float64, device=device)
    vg = v.clone().requires_grad_(True)
    for sigmas, (s, n) in (("float", (0.7, 0.6)), ("tensor", (sig_t, nxt_t))):
        yield "sde_step rollout", sigmas, lambda s=s, n=n: gg.sde_step(v, x, s, n, noise=noise)
        yield "sde_step score fwd+bwd", sigmas, lambda s=s, n=n: gg.sde_step(vg, x, s, n, prev_sample=xp).log_prob \
            .sum().backward()
        yield "policy_loss fwd", sigmas, lambda s=s, n=n: gg.policy_loss(v, x, xp, s, n, adv, old_model_output=v)
        yield "policy_loss fwd+bwd", sigmas, lambda s=s, n=n: gg.policy_loss(vg, x, xp, s, n, adv,
                                                                             old_model_output=v)[0].backward()


def _key(row):
    """A CSV row's case: (backend, op, sigmas)."""
    return row["backend"], row["op"], row["sigmas"]


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def compare(before: str, after: str) -> str:
    """Markdown table of two runs' CSVs (same backend, op, sigmas): host us before, after, and their ratio."""
    a, b = ({_key(r): float(r["host_us"]) for r in _read(path)} for path in (before, after))
    lines = ["| backend | op | sigmas | before, host us | after, host us | after / before |", "|---" * 6 + "|"]
    for key in [k for k in a if k in b]:
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {a[key]:.0f} | {b[key]:.0f} | {b[key] / a[key]:.2f} |")
    return "\n".join(lines)


def _stage(source: Path, dest: Path) -> Path:
    """Copy the package ``grpo_guard`` of ``source`` (a checkout, or a folder with the installed package) to
    ``dest``, with a checkout's top-level ``kernels/`` as ``grpo_guard/kernels`` (what setup.py's package_dir
    does): each side then imports its own kernels, not the editable install's. Returns ``dest``."""
    import shutil
    if not (source / "grpo_guard" / "__init__.py").is_file():
        raise RuntimeError(f"{source} has no grpo_guard package")
    shutil.copytree(source / "grpo_guard", dest / "grpo_guard", ignore=shutil.ignore_patterns("__pycache__"))
    if (source / "kernels").is_dir() and not (dest / "grpo_guard" / "kernels").exists():
        shutil.copytree(source / "kernels", dest / "grpo_guard" / "kernels",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def against(checkout: str, rounds: int, before_csv: str, after_csv: str, extra) -> None:
    """Run this file on ``checkout``'s grpo_guard and on this one alternately, ``rounds`` times each, in fresh
    processes; write each side's per-case minimum over the rounds. Each side's package (kernels included) is
    copied to a folder of its own, first on PYTHONPATH; both run a copy of this file (it needs only the API every
    version has); each child prints where its grpo_guard and its kernels came from, checked here."""
    import shutil
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sides = {"before": _stage(Path(checkout).resolve(), tmp / "before"),
                 "after": _stage(Path(gg.__file__).resolve().parents[1], tmp / "after")}
        script = shutil.copy(__file__, tmp / "host_overhead_copy.py")
        best = {"before": {}, "after": {}}
        for r in range(rounds):
            for side, root in sides.items():
                out = tmp / f"{side}{r}.csv"
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
                res = subprocess.run([sys.executable, script, "--csv", str(out), "--where", *extra], cwd=tmp,
                                     env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"the {side} run failed:\n{res.stdout}\n{res.stderr}")
                where = [ln.split(" from ", 1)[1] for ln in res.stdout.splitlines()
                         if ln.startswith(("grpo_guard from ", "grpo_guard.kernels from "))]
                if not where or not all(w.startswith(str(root)) for w in where):
                    raise RuntimeError(f"the {side} run imported grpo_guard from {where}; expected {root}")
                for row in _read(out):
                    key = _key(row)
                    if key not in best[side] or float(row["host_us"]) < float(best[side][key]["host_us"]):
                        best[side][key] = row
                print(f"round {r + 1}/{rounds}: {side} done", flush=True)
    _write(before_csv, list(best["before"].values()))
    _write(after_csv, list(best["after"].values()))
    print(compare(before_csv, after_csv))


def table(path: str) -> str:
    """Markdown table of one run's CSV: host us per call, float vs tensor sigmas side by side."""
    rows = _read(path)
    us = {_key(r): float(r["host_us"]) for r in rows}
    lines = ["| backend | op | float sigmas, host us | tensor sigmas, host us |", "|---" * 4 + "|"]
    for backend, op in dict.fromkeys((r["backend"], r["op"]) for r in rows):
        cells = [f"{us[(backend, op, s)]:.0f}" if (backend, op, s) in us else "" for s in ("float", "tensor")]
        lines.append(f"| {backend} | {op} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def profile(fn, device, rep, top=18):
    """Where one case's host time goes: cProfile's Python functions by own time, then the profiler's operators and
    CUDA runtime/driver calls by own CPU time (launches, allocations, stream queries)."""
    import cProfile
    import pstats
    per_call_us(fn, device, 10, repeats=1)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rep):
        fn()
    prof.disable()
    _sync(device)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                                                     else [])
    with torch.profiler.profile(activities=acts) as tp:
        for _ in range(rep):
            fn()
        _sync(device)
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="default: every backend available on the device")
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--csv", default=None)
    p.add_argument("--profile", metavar="OP", default=None, help="profile one op (e.g. 'policy_loss fwd') instead")
    p.add_argument("--sigmas", default="float", choices=("float", "tensor"), help="with --profile")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two CSVs side by side and exit")
    p.add_argument("--table", metavar="CSV", default=None, help="print one CSV as a Markdown table and exit")
    p.add_argument("--against", metavar="CHECKOUT", default=None,
                   help="time an older checkout's grpo_guard and this one alternately (with --csv-pair)")
    p.add_argument("--rounds", type=int, default=5, help="with --against")
    p.add_argument("--csv-pair", nargs=2, metavar=("BEFORE", "AFTER"), help="with --against: the two CSVs")
    p.add_argument("--where", action="store_true", help="print where grpo_guard was imported from")
    p.add_argument("--no-launch", action="store_true",
                   help="CPU, TRITON_INTERPRET=1: time the triton backend's wrapper with every launch a no-op")
    args = p.parse_args(argv)
    if args.no_launch and (args.device != "cpu" or os.environ.get("TRITON_INTERPRET") != "1"):
        p.error("--no-launch times the Triton wrapper on a CPU: use --device cpu with TRITON_INTERPRET=1 set")
    if args.against:
        if not args.csv_pair:
            p.error("--against needs --csv-pair BEFORE AFTER")
        extra = ["--device", args.device, "--rep", str(args.rep)] + (["--backends", args.backends] if args.backends
                                                                      else []) + (["--no-launch"] if args.no_launch
                                                                                  else [])
        against(args.against, args.rounds, *args.csv_pair, extra)
        return 0
    if args.table:
        print(table(args.table))
        return 0
    if args.compare:
        print(compare(*args.compare))
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    backends = args.backends.split(",") if args.backends else gg.available_backends(device)
    if args.no_launch:
        stub_launches()
    elif device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a timing target
    rows = []
    print(f"grpo_guard {gg.__version__}  torch {torch.__version__}  device {device}  rep {args.rep}")
    if args.where:
        print(f"grpo_guard from {gg.__file__}")
        try:
            from grpo_guard import kernels
            print(f"grpo_guard.kernels from {kernels.__file__}")
        except ImportError:  # no Triton: the torch/cuda backends only
            pass
    print(f"{'backend':<8} {'op':<24} {'sigmas':<7} {'host us/call':>12}")
    for name in backends:
        with gg.backend(name):
            for op, sigmas, fn in cases(device):
                if args.profile:
                    if (op, sigmas) == (args.profile, args.sigmas):
                        print(f"--- {name} {op} {sigmas}")
                        profile(fn, device, args.rep)
                    continue
                us = per_call_us(fn, device, args.rep)
                label = f"{name}-nolaunch" if args.no_launch and name == "triton" else name
                rows.append({"backend": label, "op": op, "sigmas": sigmas, "host_us": f"{us:.1f}"})
                print(f"{label:<8} {op:<24} {sigmas:<7} {us:>12.1f}", flush=True)
    if args.csv and rows:
        _write(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
