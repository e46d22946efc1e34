"""Run every benchmark on an NVIDIA GPU: providers eager / compile / gg-torch / gg-triton / gg-cuda, the SPEC §7
shapes, bf16 and fp32, forward / backward / full (+ rollout for sde_step). Prints a table and writes CSV.

    python benchmarks/run_gpu.py [--out benchmarks/results.csv] [--shapes sd35_512,wan_480p] [--rep 100]

The suite is ``grpo_guard.bench.suite`` (installed: ``grpo-guard bench``, which picks the same defaults on a GPU);
this script adds only the default ``--out`` (benchmarks/results.csv) and refuses to run without a GPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from grpo_guard.bench.suite import cli  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--device" not in argv and not torch.cuda.is_available():
        print("run_gpu.py: no CUDA GPU visible (torch.cuda.is_available() is False); for a CPU run use "
              "`grpo-guard bench` or pass --device cpu --shapes cpu_small", file=sys.stderr)
        sys.exit(2)
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).resolve().parent / "results.csv")]
    sys.exit(cli(argv))
