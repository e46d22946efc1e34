"""Sweep the Triton launch geometry (grpo_guard/ops/triton_launch.py) on an NVIDIA GPU and print, per
configuration, the GPU time per call (CUDA-graph replay after an L2 flush, host overhead removed:
``grpo_guard.bench.timing.graph_time``) of the ops that a training step runs: policy_loss forward+backward, sde_step
forward (scoring a stored x'), forward+backward and rollout. ``--fused`` sweeps the single-launch kernels'
knobs (FUSED_BLOCK_MIN, FUSED_BLOCK_MAX, FUSED_MIN_PROGRAMS, FUSED_ELEMS_PER_THREAD), else the split
kernels' (COMPILED_BLOCK, COMPILED_WARPS, MIN_PROGRAMS, MAX_ITERS).

    python -m grpo_guard.bench.tune_triton [--fused] [--shapes sd35_512,flux_1024,wan_480p] [--dtype bf16] \
        [--budget 120]
    TRITON_INTERPRET=1 python -m grpo_guard.bench.tune_triton --device cpu --shapes cpu_small --rep 2 \
        --budget 0   # smoke

(``grpo-guard bench tune_triton ...``, and from a checkout ``python benchmarks/tune_triton.py ...``, the same.)

Changing the geometry changes the order of the float sums (never the math): every configuration is checked
to keep the on-policy log-ratio exactly 0 before it is timed. Stops starting new configurations after
``--budget`` seconds and prints what it has.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

import grpo_guard as gg
from grpo_guard.ops import triton_launch

from . import policy_loss as bench_policy_loss
from . import sde_step as bench_sde_step
from .timing import graph_time, measure, mode_callables, quantiles
from .utils import ALL_SHAPES, DTYPES, parse_list

SPLIT_KNOBS = ("COMPILED_BLOCK", "COMPILED_WARPS", "MIN_PROGRAMS", "MAX_ITERS")
FUSED_KNOBS = ("FUSED_BLOCK_MIN", "FUSED_BLOCK_MAX", "FUSED_MIN_PROGRAMS", "FUSED_ELEMS_PER_THREAD")
TASKS = (("policy_loss", "full", bench_policy_loss), ("sde_step", "forward", bench_sde_step),
         ("sde_step", "full", bench_sde_step), ("sde_step", "rollout", bench_sde_step))


def configurations(fused: bool):
    """The current default first, then variations of it (BLOCK x warps, chunking)."""
    knobs = FUSED_KNOBS if fused else SPLIT_KNOBS
    default = tuple(getattr(triton_launch, k) for k in knobs)
    grid = [default]
    if fused:
        for block_max, per_thread in itertools.product((2048, 4096, 8192), (8, 16, 32)):
            grid.append((default[0], block_max, default[2], per_thread))
        for block_min, min_programs in ((512, 128), (2048, 32), (4096, 16)):
            grid.append((block_min, default[1], min_programs, default[3]))
    else:
        for block, warps in itertools.product((512, 1024, 2048, 4096), (4, 8)):
            grid.append((block, warps, default[2], default[3]))
        for min_programs, max_iters in ((32, 8), (128, 2), (256, 1), (16, 16)):
            grid.append((default[0], default[1], min_programs, max_iters))
    return knobs, list(dict.fromkeys(grid))  # without repeats, in order


def on_policy_exact(case) -> bool:
    """log p_theta - old_log_prob == 0 exactly when theta == old (sde_step scores and policy_loss agree)."""
    with torch.no_grad():
        old = gg.sde_step(case["v"], case["x"], case["sigma"], case["sigma_next"], bench_sde_step.NOISE_LEVEL,
                          prev_sample=case["x_next"]).log_prob
        _, stats = gg.policy_loss(case["v"], case["x"], case["x_next"], case["sigma"], case["sigma_next"],
                                  torch.zeros_like(old), old_log_prob=old, noise_level=bench_sde_step.NOISE_LEVEL,
                                  method="grpo")
    return bool((stats["log_ratio"] == 0).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="sd35_512,flux_1024,wan_480p")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--budget", type=float, default=120.0, help="seconds after which no new configuration starts")
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test under TRITON_INTERPRET=1")
    p.add_argument("--fused", action="store_true", help="sweep the single-launch kernels (and run them)")
    args = p.parse_args(argv)
    triton_launch.FUSED = args.fused
    knobs, configs = configurations(args.fused)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune_triton needs an NVIDIA GPU", file=sys.stderr)
        return 2
    shapes = parse_list(args.shapes, ALL_SHAPES, "shape")
    dtype = DTYPES[args.dtype]
    cases = {(op, s): mod.make_case(s, dtype, device) for op, _, mod in TASKS for s in shapes}
    providers = {op: next(q for q in mod.providers() if q.name == "gg-triton") for op, _, mod in TASKS}
    header = "  ".join(f"{k.lower():>14}" for k in knobs)
    cols = [f"{op}:{mode}:{s}" for op, mode, _ in TASKS for s in shapes]
    print(f"{header}  exact  " + "  ".join(cols) + "   (GPU us per call, CUDA graph replay)", flush=True)
    start = time.perf_counter()
    results = []
    for config in configs:
        if results and time.perf_counter() - start > args.budget:
            print(f"budget of {args.budget:.0f} s spent; stopping", flush=True)
            break
        for k, v in zip(knobs, config):
            setattr(triton_launch, k, v)
        times = []
        with gg.backend("triton"):
            exact = all(on_policy_exact(cases[("sde_step", s)]) for s in shapes)
            for op, mode, _ in TASKS:
                for s in shapes:
                    fn, before = mode_callables(providers[op], cases[(op, s)], mode)
                    if device.type == "cuda":  # the GPU's time (CUDA graph replay): launch overhead is not tuned here
                        times.append(graph_time(fn, device, rep=args.rep, before=before) * 1e3)
                    else:
                        times.append(quantiles(measure(fn, device, rep=args.rep, before=before))[0] * 1e3)
        results.append((config, exact, times))
        print("  ".join(f"{v:>14}" for v in config) + f"  {str(exact):>5}  " +
              "  ".join(f"{t:>{len(c)}.1f}" for t, c in zip(times, cols)), flush=True)
    if results:
        base = results[0][2]

        def relative(r):
            return sum(t / b for t, b in zip(r[2], base)) / len(base)
        best = min(results, key=relative)
        print(f"\nbest by mean relative time: {dict(zip(knobs, best[0]))} exact={best[1]} "
              f"({relative(best):.3f} of the default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
