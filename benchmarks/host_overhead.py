"""Runs ``grpo_guard.bench.host_overhead``: host time per call of the public ops (``--table``, ``--compare``,
``--profile``).

The code ships with the package (``python -m grpo_guard.bench.host_overhead``); this file keeps the checkout's commands
``python benchmarks/host_overhead.py ...`` and ``python -m benchmarks.host_overhead ...`` working."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's grpo_guard, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_guard.bench.host_overhead import *  # noqa: E402,F401,F403  (the names this module had)
from grpo_guard.bench.host_overhead import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
