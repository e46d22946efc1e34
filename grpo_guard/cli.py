"""``grpo-guard``: info | train | demo | bench. Each subcommand lives in the module that owns it; this file
only routes (``grpo-guard SUBCOMMAND --help`` for each)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with a ``main(argv)``, one-line help)
SUBCOMMANDS = {
    "info": ("grpo_guard.info", "versions, devices, which backends can run, and a self-check"),
    "train": ("grpo_guard.trainer.cli", "train a diffusers SD3/Flux model with Flow-GRPO / GRPO-Guard"),
    "demo": ("grpo_guard.demo.cli", "reproduce over-optimization and its cure on a CPU"),
    "bench": ("grpo_guard.bench.cli", "time the ops on this machine (the benchmark suite)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="grpo-guard", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(
        f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module_name = SUBCOMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"grpo-guard {args.command}: not available in this build ({module_name} missing)",
                  file=sys.stderr)
            return 2
        raise
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
