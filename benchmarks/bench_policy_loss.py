"""Runs ``grpo_guard.bench.policy_loss``: the policy_loss benchmark (the suite's options, for this op only).

The code ships with the package (``python -m grpo_guard.bench.policy_loss``); this file keeps the checkout's commands
``python benchmarks/bench_policy_loss.py ...`` and ``python -m benchmarks.bench_policy_loss ...`` working."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's grpo_guard, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_guard.bench.policy_loss import *  # noqa: E402,F401,F403  (the names this module had)
from grpo_guard.bench.policy_loss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
