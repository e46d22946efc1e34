"""``grpo-guard train CONFIG [--set KEY=VALUE ...] [--resume [PATH]]`` (also ``accelerate launch -m grpo_guard.train``).

Examples:
    grpo-guard train configs/tiny_sd3.yaml --set train.method=grpo --set run.num_steps=3
    grpo-guard train configs/sd35m_pickscore_guard.yaml --resume
    accelerate launch --num_processes 8 -m grpo_guard.train configs/sd35m_pickscore_guard.yaml
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-guard train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.method=grpo (repeatable; values parsed as YAML)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest complete checkpoint in run.output_dir (or from PATH)")
    p.add_argument("--output-dir", help="shorthand for --set run.output_dir=...")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError, load
    from .rewards import RewardError
    from .loop import NonFiniteLossError, Trainer

    overrides = list(args.overrides) + ([f"run.output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load(args.config, overrides)
        trainer = Trainer(cfg)
        if args.resume:
            found = trainer.resume(None if args.resume == "latest" else args.resume)
            if trainer.acc.is_main_process:
                print(f"resumed at step {trainer.global_step}" if found else
                      "no checkpoint to resume from; starting from step 0", file=sys.stderr)
        trainer.train()
    except (ConfigError, RewardError, NonFiniteLossError, CheckpointError) as exc:
        print(f"grpo-guard train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
