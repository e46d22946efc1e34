"""``grpo-guard bench``: time grpo_guard's ops on this machine with its defaults (the suite of
:mod:`grpo_guard.bench.suite`), or run one of the other benchmark tools by name.

    grpo-guard bench                                     # CPU: cpu_small, eager vs gg-torch; GPU: every provider
    grpo-guard bench --shapes sd35_512 --dtypes bf16 --modes forward,full --out results.csv
    grpo-guard bench --markdown-from results.csv         # a previous run's CSV as a Markdown table
    grpo-guard bench --compare-from split=a.csv fused=b.csv [--provider gg-triton]
    grpo-guard bench --passes-from results.csv           # forward and backward passes apart (GPU run)
    grpo-guard bench host_overhead | precision | tune_triton | trainer [--help]   # the other tools

Everything runs from the installed package; a checkout's ``benchmarks/`` scripts call the same code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: ``grpo-guard bench TOOL ...`` -> the module whose ``main(argv)`` runs it (one-line help)
TOOLS = {
    "host_overhead": ("grpo_guard.bench.host_overhead", "host time per call of the public ops at a tiny shape"),
    "precision": ("grpo_guard.bench.precision", "float32 precision of log r_hat, published formula vs grpo_guard"),
    "tune_triton": ("grpo_guard.bench.tune_triton", "sweep the Triton launch geometry (NVIDIA GPU)"),
    "trainer": ("grpo_guard.bench.trainer", "trainer steps of an SD3.5-M-sized transformer (needs diffusers)"),
}


def _parser(torch) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-guard bench",
        description="Time grpo_guard's ops against the published eager formulas on this machine "
                    "(CPU: small shapes, eager vs the torch backend; GPU: every provider at the SPEC §7 shapes).",
        epilog="other tools, grpo-guard bench TOOL [--help]: " + "; ".join(f"{k}: {v[1]}" for k, v in TOOLS.items()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--ops", default=None, help="comma-separated, of sde_step,policy_loss (default all)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shape names (default: 'cpu_small' on CPU, all SPEC §7 shapes on GPU)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="forward,backward,full,rollout")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers (default: eager,gg-torch on CPU; all on GPU)")
    parser.add_argument("--compile", action="store_true", help="on CPU, also time torch.compile of the baselines")
    parser.add_argument("--rep", type=int, default=None, help="timed calls per case (default 20 on CPU, 100 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    from . import suite
    suite.add_readback_arguments(parser)
    return parser


def main(argv=None) -> int:
    """``grpo-guard bench [TOOL] ...``: the suite with this machine's defaults, or the named tool's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].replace("-", "_") in TOOLS:
        tool = argv[0].replace("-", "_")
        module = importlib.import_module(TOOLS[tool][0])
        prog, sys.argv[:1] = sys.argv[:1], [f"grpo-guard bench {tool}"]  # the tool's argparse usage line
        try:
            return int(module.main(argv[1:]) or 0)
        finally:
            sys.argv[:1] = prog

    import torch

    from . import suite

    args = _parser(torch).parse_args(argv)
    if args.compare_from or args.markdown_from or args.passes_from:
        return suite.readback(args)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    providers = args.providers
    if providers is None and on_cpu:
        providers = "eager,compile,gg-torch" if args.compile else "eager,gg-torch"
    return suite.main_run(device=device,
                          shapes=args.shapes or ("cpu_small" if on_cpu else None),
                          dtypes=args.dtypes, modes=args.modes, providers=providers, ops=args.ops, out=args.out,
                          rep=args.rep or (20 if on_cpu else 100), threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
