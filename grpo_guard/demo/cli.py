"""``grpo-guard demo``: Flow-GRPO vs GRPO-Guard on a tiny SD3 digits model, on a CPU, offline.

    grpo-guard demo                      # grpo vs guard, default setting (<= 10 min on 2 CPU cores)
    grpo-guard demo --ablations          # also mean_revised and ratio_norm
    grpo-guard demo --steps 120          # longer run;  --full: the longer, stronger preset
    grpo-guard demo pretrain             # re-create the shipped base weights (deterministic from --seed)
                                         # into runs/demo-pretrain/; use them with --weights PATH
    grpo-guard demo study --out DIR      # the paired multi-seed study of grpo / guard / dppo (STUDY.md, CSV,
                                         # figures; resumable); grpo-guard demo study --help
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

FULL_STEPS = 150


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-guard demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("action", nargs="?", choices=["run", "pretrain", "study"], default="run",
                   help="run (default): train and compare the methods; pretrain: re-create the base weights; "
                        "study: the multi-seed study (its own options: grpo-guard demo study --help)")
    p.add_argument("--out", help="output folder (default runs/demo-<date>/; pretrain: runs/demo-pretrain/)")
    p.add_argument("--seed", type=int, default=0, help="the RL seed (LoRA init, prompts, rollout noise)")
    p.add_argument("--reward-seed", type=int, default=0,
                   help="fits the proxy/gold reward models and draws the evaluation set (default 0)")
    p.add_argument("--steps", type=int, help="training steps per method")
    p.add_argument("--full", action="store_true", help=f"a longer, stronger run ({FULL_STEPS} steps)")
    p.add_argument("--ablations", action="store_true", help="also run mean_revised and ratio_norm")
    p.add_argument("--eval-every", type=int, help="evaluate the fixed sample set every k steps")
    p.add_argument("--weights", help="base weights (.safetensors; default: the shipped ones)")
    p.add_argument("--clip-range", type=float, help="the clip range of every method (default 1e-4, Flow-GRPO's; "
                                                     "GRPO-Guard's paper uses 2e-6 / 4e-6)")
    p.add_argument("--iters", type=int, help="pretrain: optimizer iterations")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _pretrain(args) -> int:
    from . import model, pretrain

    out = args.out or os.path.join("runs", "demo-pretrain") + os.sep
    if out.endswith(os.sep) or os.path.isdir(out):
        out = os.path.join(out, os.path.basename(model.ASSET))
    pretrain.run(out=out, seed=args.seed, iters=args.iters or pretrain.DEFAULT_ITERS, progress=not args.no_progress)
    return 0


def run(args, argv) -> str:
    """The default action; returns the output folder."""
    import torch

    from ..trainer.metrics import read as read_metrics
    from . import experiment as ex, figures, report

    torch.set_num_threads(1)  # the tiny model runs fastest on one intra-op thread (and is reproducible)
    t0 = time.perf_counter()
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = args.out or os.path.join("runs", "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"grpo-guard demo: {out} is not empty; choose another --out")
    os.makedirs(out, exist_ok=True)
    s = ex.Settings(seed=args.seed, reward_seed=args.reward_seed)
    if args.full:
        s.steps = FULL_STEPS
    if args.steps:
        s.steps = args.steps
    if args.eval_every:
        s.eval_every = args.eval_every
    if args.weights:
        s.weights = args.weights
    if args.clip_range is not None:
        if not 0 < args.clip_range < 1:
            raise SystemExit(f"grpo-guard demo: --clip-range must be in (0, 1), got {args.clip_range}")
        s.clip_range = args.clip_range
    if args.ablations:
        s.methods = ["grpo", "mean_revised", "ratio_norm", "guard"]
    progress = not args.no_progress
    print(f"grpo-guard demo: {', '.join(s.methods)}, {s.steps} steps each, seed {s.seed} -> {out}", flush=True)
    base = ex.base_eval(s)
    print(f"base model: proxy {base['raw']['proxy_logit']:.3f}, digit prob {base['raw']['digit_prob']:.3f}, "
          f"realism {base['raw']['realism']:.3f} (gold normalizers)", flush=True)
    runs = {}
    for m in s.methods:
        runs[m] = ex.run_method(s, m, out, base["scales"], progress=progress)
        runs[m]["records"] = read_metrics(os.path.join(out, m, "metrics.jsonl"))
        f = runs[m]["evals"][s.steps]
        print(f"{m}: step {s.steps}: proxy {f['proxy_logit']:.3f}, gold {f['gold']:.3f} "
              f"({runs[m]['wall_s']:.0f} s)", flush=True)
    figs = figures.write_all(out, runs, base, s.eval_per_digit)
    wall = time.perf_counter() - t0
    command = "grpo-guard demo" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    path = report.write(out, command, ex.settings_dict(s), base, runs, figs, wall, date)
    print(f"wrote {path} and {len(figs['files'])} figures; wall time {wall:.0f} s", flush=True)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["study"]:
        from . import study
        return study.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.action == "pretrain":
        return _pretrain(args)
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
