"""REPORT.md of a demo run, written from the run's own numbers."""
from __future__ import annotations

import os
import platform
from typing import Dict

from .figures import LABELS, per_timestep

STUDY_DOC = "docs/demo/study/STUDY.md in the repository"  # the committed study's report


def versions() -> Dict[str, str]:
    import diffusers
    import sklearn
    import torch
    import transformers

    import grpo_guard

    return {"grpo_guard": getattr(grpo_guard, "__version__", "?"), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1"}


def _final(run: Dict) -> Dict:
    return run["evals"][max(run["evals"])]


def _peak_gold(run: Dict):
    step = max(run["evals"], key=lambda k: run["evals"][k]["gold"])
    return step, run["evals"][step]["gold"]


def verdict(runs: Dict[str, Dict], base: Dict, settings: Dict) -> str:
    """An honest, number-based reading of grpo vs guard (empty if either is missing)."""
    if "grpo" not in runs or "guard" not in runs:
        return ""
    g, q = _final(runs["grpo"]), _final(runs["guard"])
    bp = base["scores"]["proxy_logit"]
    lines = []
    over = g["proxy_logit"] > bp + 0.05 * max(abs(bp), 1.0) and g["gold"] < 0.97  # clearly, not by noise
    lines.append(f"- Baseline (Flow-GRPO): proxy {bp:.2f} -> {g['proxy_logit']:.2f}, gold 1.00 -> {g['gold']:.3f}: "
                 + ("**over-optimization reproduced** (proxy up, gold below the base model)." if over else
                    "over-optimization **not** clearly reproduced at the final step (it needs the proxy up by "
                    "> 5 % and gold below 0.97)."))
    d_gold, d_proxy = q["gold"] - g["gold"], q["proxy_logit"] - g["proxy_logit"]
    if d_gold > 0.01:
        res = f"GRPO-Guard ends with **higher gold** ({q['gold']:.3f} vs {g['gold']:.3f}, {d_gold:+.3f})"
    elif d_gold < -0.01:
        res = f"GRPO-Guard ends with **lower gold** ({q['gold']:.3f} vs {g['gold']:.3f}, {d_gold:+.3f}): in this " \
              f"miniature Guard does **not** beat the baseline"
    else:
        res = f"GRPO-Guard and the baseline end with about the same gold ({q['gold']:.3f} vs {g['gold']:.3f})"
    lines.append(f"- {res}, at proxy {q['proxy_logit']:.2f} vs {g['proxy_logit']:.2f} ({d_proxy:+.2f}).")
    if d_gold > 0.01 and d_proxy < -0.1 * abs(g["proxy_logit"] - bp):
        lines.append("- Caveat: Guard also optimized the proxy less; part of its gold advantage can be the smaller "
                     "policy change rather than a better trade-off. Compare the curves at equal proxy in "
                     "`rewards.png`.")
    for m in ("grpo", "guard"):
        if runs[m].get("records"):
            sig, mean = per_timestep(runs[m]["records"], "ratio_mean")
            lines.append(f"- {LABELS[m]}: importance-ratio mean over the off-policy updates, highest-noise trained "
                         f"timestep (sigma {sig[0]:.2f}) {mean[0]:.6f}, lowest-noise (sigma {sig[-1]:.2f}) "
                         f"{mean[-1]:.6f}.")
    lines.append(f"- What one run can support: the **diagnosis** (the baseline's proxy rises while gold falls; its "
                 f"importance ratio is biased below 1, most at low noise; its per-timestep gradient norms are "
                 f"unbalanced; Guard removes both). What it cannot: whether Guard (or Flow-DPPO) ends with more "
                 f"gold. One seed and {10 * settings['eval_per_digit']} evaluation images put differences of a few "
                 f"0.01 in gold within run-to-run noise; that question is answered by the paired multi-seed study, "
                 f"`grpo-guard demo study` ({STUDY_DOC}).")
    lines.append(f"- Both methods use clip_range {settings['clip_range']:g} (only `train.method` differs). The published "
                 "GRPO-Guard recipe pairs RatioNorm with a tighter 2e-6 / 4e-6, so Guard here is clipped less "
                 "than in the paper.")
    return "\n".join(lines)


def write(out: str, command: str, settings: Dict, base: Dict, runs: Dict[str, Dict], figs: Dict,
          wall_s: float, date: str) -> str:
    """Write ``out/REPORT.md``; returns its path."""
    v = versions()
    steps = max(max(r["evals"]) for r in runs.values())
    walls = ", ".join(f"{m} {r['wall_s']:.0f} s" for m, r in runs.items())
    lines = [
        "# grpo-guard demo: implicit over-optimization in miniature",
        "",
        f"- command: `{command}`",
        f"- date: {date}; RL seed: {settings['seed']}; reward seed: {settings.get('reward_seed', settings['seed'])}; "
        f"total wall time: **{wall_s:.0f} s** "
        f"({walls})",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "The base model is a tiny diffusers `SD3Transformer2DModel` (pixel space, 8x8) pretrained on scikit-learn's "
        "digits, prompted \"a handwritten <d>\". The proxy reward is the logit of the prompted digit under a linear "
        "classifier fit on 30 images (exploitable); the gold rewards, never optimized, are a kernel classifier's "
        "probability of the prompted digit and a nearest-neighbour realism score, each divided by the base model's "
        "score (base = 1.00); **gold** below is their mean. Scores are on a fixed evaluation set "
        f"({settings['eval_per_digit']} samples per digit, the same noise for every method and step).",
        "",
        "## Result (SPEC §8 shape)",
        "",
        "| setup | step | proxy (grpo / guard) | baseline gold | Guard gold |",
        "|---|---|---|---|---|",
    ]
    if "grpo" in runs and "guard" in runs:
        g, q = _final(runs["grpo"]), _final(runs["guard"])
        lines.append(f"| tiny SD3 digits, proxy = 30-shot linear logit | {steps} | {g['proxy_logit']:.2f} / "
                     f"{q['proxy_logit']:.2f} (base {base['scores']['proxy_logit']:.2f}) | {g['gold']:.3f} | "
                     f"{q['gold']:.3f} |")
    lines += ["", "## Every method at the final step", "",
              "| method | step | proxy logit | gold digit prob | gold realism | gold (mean) | peak gold (step) |",
              "|---|---|---|---|---|---|---|",
              f"| base model | 0 | {base['scores']['proxy_logit']:.2f} | 1.000 | 1.000 | 1.000 | - |"]
    for m, r in runs.items():
        f = _final(r)
        ps, pg = _peak_gold(r)
        lines.append(f"| {LABELS.get(m, m)} | {max(r['evals'])} | {f['proxy_logit']:.2f} | {f['digit_prob']:.3f} | "
                     f"{f['realism']:.3f} | {f['gold']:.3f} | {pg:.3f} ({ps}) |")
    lines += ["", f"Raw base scores (the normalizers): digit prob {base['raw']['digit_prob']:.4f}, realism "
              f"{base['raw']['realism']:.4f}.", "", "## Reading", "", verdict(runs, base, settings) or "(grpo and guard were "
              "not both run)", "",
              "Per-timestep gradient-norm spread (max / min over trained timesteps, mean over all updates): "
              + ", ".join(f"{m} {s:.1f}x" for m, s in figs["grad_spread"].items()) + ".", "",
              "## Setting (identical for every method except `train.method`)", "", "```"]
    lines += [f"{k}: {val}" for k, val in settings.items() if k != "methods"]
    lines += ["```", "", "## Figures", ""]
    captions = {"rewards": "proxy and gold reward over steps (thick: evaluation set; thin: training rollouts)",
                "ratio": "importance-ratio mean and std per timestep (off-policy updates; Guard's is the "
                         "RatioNorm ratio)",
                "grad": "each timestep's own gradient norm, relative to the median timestep",
                "samples": "samples of every digit: base model, then each method mid-run and at the end"}
    for key, name in figs["files"].items():
        lines += [f"![{captions[key]}]({name})", f"*{captions[key]}*", ""]
    lines += ["Logs: `<method>/metrics.jsonl` (the trainer's, one line per step), `<method>/tensorboard/`, "
              "`<method>/eval.json` (evaluation-set scores), `<method>/checkpoints/`.", ""]
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
