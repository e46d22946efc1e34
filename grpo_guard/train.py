"""``python -m grpo_guard.train CONFIG ...`` -- the entry point for ``accelerate launch -m grpo_guard.train``;
the same as ``grpo-guard train`` (see :mod:`grpo_guard.trainer.cli`)."""
import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
