"""Runs the op benchmarks (:mod:`.sde_step`, :mod:`.policy_loss`): copy bandwidth, every provider x shape x dtype x
mode, a table on stdout and optionally a CSV. Shared by ``grpo-guard bench``, the per-op modules and a checkout's
``python benchmarks/run_gpu.py`` / ``python -m benchmarks.suite``.

    python -m grpo_guard.bench.suite [--device cuda] [--ops sde_step] [--shapes sd35_512] [--out results.csv]
    python -m grpo_guard.bench.suite --markdown-from results.csv          # a previous run as a Markdown table
    python -m grpo_guard.bench.suite --compare-from split=a.csv fused=b.csv [--provider gg-triton]
    python -m grpo_guard.bench.suite --passes-from results.csv [--provider gg-triton,gg-cuda]  # fwd, bwd apart
"""
from __future__ import annotations

import argparse
import importlib

import torch

from .timing import (compare_table, copy_bandwidth, environment, format_table, markdown_table, passes_table,
                     read_copy_gbps, read_csv, run_op, speedups, write_csv)
from .utils import ALL_SHAPES, DTYPES, SHAPES, parse_list

#: op name -> the module defining it (MODES, make_case, bytes_moved, providers)
OPS = {"sde_step": "grpo_guard.bench.sde_step", "policy_loss": "grpo_guard.bench.policy_loss"}


def main_run(*, device, shapes=None, dtypes="bf16,fp32", modes="forward,backward,full", providers=None,
             ops=None, out=None, rep=100, warmup=5, max_seconds=10.0, quiet=False, threads=None) -> int:
    """Run the suite and print the table; returns 0 (an exit status). On CPU, ``threads`` torch threads (default
    1: on a shared machine, multi-threaded reductions stall on OpenMP barriers and time the neighbours)."""
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    op_names = parse_list(ops, OPS, "op")
    shape_names = parse_list(shapes, ALL_SHAPES, "shape") if shapes else list(SHAPES)
    dtype_list = [DTYPES[d] for d in parse_list(dtypes, DTYPES, "dtype")]
    env = environment(device)
    log = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    log("  ".join(f"{k}={v}" for k, v in env.items()))
    copy_gbps = copy_bandwidth(device)
    log(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    rows = []
    for op in op_names:
        module = importlib.import_module(OPS[op])
        mode_list = [m for m in parse_list(modes, module.MODES + ("rollout",), "mode") if m in module.MODES]
        available = module.providers()
        chosen = [p for p in available if providers is None or p.name in parse_list(
            providers, [q.name for q in available], "provider")]
        for shape in shape_names:
            for dtype in dtype_list:
                log(f"{op} {shape} {str(dtype).replace('torch.', '')}: {', '.join(p.name for p in chosen)} x "
                    f"{', '.join(mode_list)}")
                case = module.make_case(shape, dtype, device)
                rows += run_op(op, chosen, [case], mode_list, device, module.bytes_moved, copy_gbps,
                               warmup=warmup, rep=rep, max_seconds=max_seconds, log=log)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print()
    print(format_table(rows, copy_gbps, env))
    lines = speedups(rows, "eager")
    if lines:
        print()
        print("\n".join(lines))
    if out:
        write_csv(rows, out, env, copy_gbps)
        print(f"\nwrote {out}")
    return 0


def add_readback_arguments(parser) -> None:
    """--markdown-from / --compare-from / --provider: tables from CSVs of earlier runs (no timing)."""
    parser.add_argument("--markdown-from", default=None, metavar="CSV",
                        help="print the rows of a CSV written by a previous run as a Markdown table, and exit")
    parser.add_argument("--compare-from", nargs="+", default=None, metavar="LABEL=CSV",
                        help="print one provider's GPU time across runs (e.g. split=a.csv fused=b.csv), and exit")
    parser.add_argument("--provider", default=None,
                        help="with --compare-from (default gg-triton); with --passes-from, comma-separated (default "
                             "every one)")
    parser.add_argument("--passes-from", default=None, metavar="CSV",
                        help="print each op's forward and backward (full - forward) pass apart from a GPU run's CSV: "
                             "GPU time, GB/s, %% of the run's copy bandwidth; and exit")


def readback(args) -> int:
    """Print the table :func:`add_readback_arguments`' options ask for."""
    if args.compare_from:
        runs = [(item.split("=", 1)[0], read_csv(item.split("=", 1)[1])) for item in args.compare_from]
        print(compare_table(runs, args.provider or "gg-triton"))
    elif args.passes_from:
        copy = read_copy_gbps(args.passes_from)
        if copy is None:
            raise SystemExit(f"--passes-from: {args.passes_from} records no copy bandwidth (not a GPU run's CSV)")
        providers = [p.strip() for p in args.provider.split(",")] if args.provider else None
        print(passes_table(read_csv(args.passes_from), copy, providers))
    else:
        print(markdown_table(read_csv(args.markdown_from)))
    return 0


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=None, help=f"comma-separated, of {list(OPS)} (default all)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {list(ALL_SHAPES)} "
                        "(default: the SPEC §7 shapes)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="forward,backward,full,rollout")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default all)")
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--out", default=None, help="CSV file to write")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    add_readback_arguments(parser)
    args = parser.parse_args(argv)
    if args.compare_from or args.markdown_from or args.passes_from:
        return readback(args)
    return main_run(device=args.device, shapes=args.shapes, dtypes=args.dtypes, modes=args.modes,
                    providers=args.providers, ops=args.ops, out=args.out, rep=args.rep,
                    threads=args.threads)


def main(argv=None) -> int:
    """``python -m grpo_guard.bench.suite``: :func:`cli` (every shape of SPEC §7 by default, on any device; the
    machine-aware defaults are ``grpo-guard bench``'s, :mod:`grpo_guard.bench.cli`)."""
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
