"""Runs ``grpo_guard.bench.tune_triton``: the Triton launch-geometry sweep (``--fused``, ``--budget``).

The code ships with the package (``python -m grpo_guard.bench.tune_triton``); this file keeps the checkout's commands
``python benchmarks/tune_triton.py ...`` and ``python -m benchmarks.tune_triton ...`` working."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's grpo_guard, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_guard.bench.tune_triton import *  # noqa: E402,F401,F403  (the names this module had)
from grpo_guard.bench.tune_triton import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
