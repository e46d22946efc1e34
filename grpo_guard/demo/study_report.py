"""The study's analysis: per-run numbers, paired differences against the baseline, STUDY.md, study.csv, figures.

Everything STUDY.md states is a row of ``study.csv`` (section, method, metric, statistic, seed, value), and
every table of STUDY.md is rendered from those rows. Only seeds whose every method finished enter the
statistics (the comparison is paired); unfinished runs are listed.

Primary metric, fixed before any run: ``gold_at_equal_proxy`` (definition: :data:`EQUAL_PROXY`), paired
difference ``method - grpo`` over RL seeds, mean and two-sided 95 % Student-t interval (n - 1 degrees of
freedom). A method is called better (worse) than the baseline only when the interval lies above (below) 0.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..trainer.metrics import read as read_metrics
from .figures import COLORS, LABELS, per_timestep

PRIMARY = "gold_at_equal_proxy"
EQUAL_PROXY = (
    "For each RL seed, the equal-proxy level P* is the highest evaluation-set proxy that every method of that seed "
    "reaches: P* = min over methods of (max over evaluations of the proxy). A run's gold at equal proxy is its "
    "evaluation-set gold where its proxy first reaches P*, linearly interpolated between the two evaluations that "
    "bracket the crossing (in step order). Every run of the seed is thus compared at the same proxy value.")
CONFIDENCE = 0.95
LABELS = dict(LABELS, dppo="Flow-DPPO (dppo)")
COLORS = dict(COLORS, dppo="tab:purple")
# (key, label, better-is) of the per-run numbers; the first is the primary metric
METRICS = [
    (PRIMARY, "gold at equal proxy", "higher"),
    ("final_gold", "final gold", "higher"),
    ("final_proxy", "final proxy", "higher"),
    ("final_digit_prob", "final gold: digit prob", "higher"),
    ("final_realism", "final gold: realism", "higher"),
    ("peak_gold", "peak gold after step 0", "higher"),
    ("ratio_mean_dev", "max over timesteps of abs(ratio mean - 1) (off-policy)", "lower"),
    ("grad_spread", "per-timestep gradient-norm spread (max / min)", "lower"),
    ("clipfrac", "clip fraction (off-policy updates)", "-"),
]
DPPO_METRICS = [("masked_fraction", "dppo: masked fraction (off-policy)", "-"),
                ("kl_mean", "dppo: per-step KL mean (off-policy)", "-")]


def t_interval(x) -> Tuple[float, float, float]:
    """(mean, low, high) of the two-sided Student-t interval at :data:`CONFIDENCE` (n >= 2)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    m = float(x.mean())
    if n < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half


def crossing(evals: Dict[int, Dict], level: float) -> Optional[Tuple[float, float]]:
    """(step, gold) where the evaluation-set proxy first reaches ``level`` (linear interpolation between the
    bracketing evaluations; the first evaluation itself when it is already at the level), or None."""
    prev = None
    for step in sorted(evals):
        p, g = evals[step]["proxy_logit"], evals[step]["gold"]
        if p >= level:
            if prev is None:
                return float(step), g
            s0, p0, g0 = prev
            w = (level - p0) / (p - p0)
            return s0 + w * (step - s0), g0 + w * (g - g0)
        prev = (step, p, g)
    return None


def _off_policy_mean(records, key) -> float:
    vals = [t[key] for r in records for u in (r["updates"][1:] if len(r["updates"]) > 1 else r["updates"])
            for t in u["timesteps"] if key in t]
    return float(np.mean(vals)) if vals else float("nan")


def load_run(path: str) -> Dict:
    """One finished run: its evaluations and the summaries of its training log."""
    with open(os.path.join(path, "eval.json")) as f:
        ev = json.load(f)
    evals = {int(k): v for k, v in ev["evals"].items()}
    records = read_metrics(os.path.join(path, "metrics.jsonl"))
    last = evals[max(evals)]
    sig, ratio = per_timestep(records, "ratio_mean")
    _, grad = per_timestep(records, "grad_norm", off_policy_only=False)
    out = {"evals": evals, "wall_s": ev["wall_s"], "sigma": sig, "ratio_per_t": ratio, "grad_per_t": grad,
           "final_gold": last["gold"], "final_proxy": last["proxy_logit"], "final_digit_prob": last["digit_prob"],
           "final_realism": last["realism"], "peak_gold": max(e["gold"] for k, e in evals.items() if k > 0),
           "ratio_mean_dev": float(np.max(np.abs(ratio - 1))), "grad_spread": float(grad.max() / max(grad.min(), 1e-30)),
           "clipfrac": _off_policy_mean(records, "clipfrac"),
           "masked_fraction": _off_policy_mean(records, "masked_fraction"),
           "kl_mean": _off_policy_mean(records, "kl_mean")}
    return out


def analyze(out: str, study: Dict) -> Dict:
    """Load the finished runs and compute every number of the report (as csv rows and structured results)."""
    from .study import finished, run_dir

    methods, base_m = study["methods"], study["baseline"]
    complete = [s for s in study["rl_seeds"] if all(finished(out, s, m) for m in methods)]
    missing = [(s, m) for s in study["rl_seeds"] for m in methods if not finished(out, s, m)]
    runs = {(s, m): load_run(run_dir(out, s, m)) for s in complete for m in methods}
    rows: List[Dict] = []

    def row(section, method, metric, statistic, value, seed=""):
        rows.append({"section": section, "method": method, "metric": metric, "statistic": statistic, "seed": seed,
                     "value": value})

    for s in complete:
        level = min(max(e["proxy_logit"] for e in runs[(s, m)]["evals"].values()) for m in methods)
        row("equal_proxy", "", "level", "value", level, s)
        for m in methods:
            step, gold = crossing(runs[(s, m)]["evals"], level)
            runs[(s, m)][PRIMARY] = gold
            row("equal_proxy", m, "crossing_step", "value", step, s)
    metrics = METRICS + (DPPO_METRICS if "dppo" in methods else [])
    for s in complete:
        for m in methods:
            for key, _, _ in metrics:
                if key in ("masked_fraction", "kl_mean") and m != "dppo":
                    continue
                row("run", m, key, "value", runs[(s, m)][key], s)
            row("run", m, "wall_s", "value", runs[(s, m)]["wall_s"], s)
    summary, paired = {}, {}
    if len(complete) >= 2:
        for m in methods:
            for key, _, _ in metrics:
                if key in ("masked_fraction", "kl_mean") and m != "dppo":
                    continue
                mean, lo, hi = t_interval([runs[(s, m)][key] for s in complete])
                summary[(m, key)] = (mean, lo, hi)
                for stat, v in (("mean", mean), ("ci_low", lo), ("ci_high", hi)):
                    row("summary", m, key, stat, v)
        for m in methods:
            if m == base_m:
                continue
            for key, _, better in METRICS:
                d = [runs[(s, m)][key] - runs[(s, base_m)][key] for s in complete]
                mean, lo, hi = t_interval(d)
                wins = sum(1 for x in d if (x > 0 if better != "lower" else x < 0))
                paired[(m, key)] = (mean, lo, hi, wins)
                for stat, v in (("mean", mean), ("ci_low", lo), ("ci_high", hi), ("seeds_better", wins)):
                    row("paired", m, key, stat, v)
                for s, x in zip(complete, d):
                    row("paired", m, key, "difference", x, s)
        for m in methods:  # per-timestep diagnostics, mean over seeds
            sig = runs[(complete[0], m)]["sigma"]
            for i, sg in enumerate(sig):
                row("per_timestep", m, "ratio_mean", f"sigma={sg:.4f}",
                    float(np.mean([runs[(s, m)]["ratio_per_t"][i] for s in complete])))
                row("per_timestep", m, "grad_norm", f"sigma={sg:.4f}",
                    float(np.mean([runs[(s, m)]["grad_per_t"][i] for s in complete])))
    return {"complete": complete, "missing": missing, "runs": runs, "rows": rows, "summary": summary,
            "paired": paired, "metrics": metrics}


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    return f"{v:.4g}" if a >= 100 or a == 0 else (f"{v:.3f}" if a >= 0.01 else f"{v:.2e}")


def _verdict(m: str, key: str, paired: Dict, n: int) -> str:
    mean, lo, hi, wins = paired[(m, key)]
    better = dict((k, b) for k, _, b in METRICS)[key]
    if lo > 0:
        word = "higher" if better == "higher" else "higher (worse)"
    elif hi < 0:
        word = "lower" if better == "lower" else "lower (worse)"
    else:
        word = "not distinguishable from the baseline (the interval contains 0)"
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}], better in {wins} of {n} seeds: {word}"


def figures(out: str, study: Dict, res: Dict, base: Dict) -> Dict[str, str]:
    """gold vs proxy per method (mean over seeds, band: 95 % t interval of gold), paired differences, and the
    per-timestep diagnostics. Returns {name: file}."""
    from .figures import _plt

    plt = _plt()
    files = {"gold_vs_proxy": "study_gold_vs_proxy.png", "paired": "study_paired_differences.png",
             "per_timestep": "study_per_timestep.png"}
    complete, runs, methods = res["complete"], res["runs"], study["methods"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for m in methods:
        c = COLORS.get(m)
        steps = sorted(runs[(complete[0], m)]["evals"])
        P = np.array([[runs[(s, m)]["evals"][k]["proxy_logit"] for k in steps] for s in complete])
        G = np.array([[runs[(s, m)]["evals"][k]["gold"] for k in steps] for s in complete])
        for i in range(len(complete)):
            ax.plot(P[i], G[i], color=c, alpha=0.18, lw=0.8)
        band = np.array([t_interval(G[:, j]) for j in range(len(steps))])
        ax.plot(P.mean(0), band[:, 0], color=c, lw=2.2, marker="o", ms=3, label=LABELS.get(m, m))
        ax.fill_between(P.mean(0), band[:, 1], band[:, 2], color=c, alpha=0.18)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="proxy reward (evaluation set)", ylabel="gold (base = 1.00)",
           title=f"gold vs proxy, {len(complete)} seeds (thin: each seed; band: 95 % t interval of gold)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, files["gold_vs_proxy"]), dpi=110)
    plt.close(fig)

    keys = [PRIMARY, "final_gold", "final_proxy"]
    others = [m for m in methods if m != study["baseline"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, key in zip(axes, keys):
        for j, m in enumerate(others):
            d = [r["value"] for r in res["rows"] if r["section"] == "paired" and r["method"] == m
                 and r["metric"] == key and r["statistic"] == "difference"]
            mean, lo, hi, _ = res["paired"][(m, key)]
            ax.scatter([j] * len(d), d, color=COLORS.get(m), alpha=0.45, s=14)
            ax.errorbar([j + 0.15], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=COLORS.get(m), capsize=4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(others)))
        ax.set_xticklabels([f"{m} - {study['baseline']}" for m in others], fontsize=8)
        ax.set_title(dict((k, lb) for k, lb, _ in METRICS)[key], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("paired differences against the baseline (dots: seeds; bar: mean, 95 % t interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, files["paired"]), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        sig = runs[(complete[0], m)]["sigma"]
        r = np.mean([runs[(s, m)]["ratio_per_t"] for s in complete], axis=0)
        g = np.mean([runs[(s, m)]["grad_per_t"] for s in complete], axis=0)
        axes[0].plot(sig, r - 1, color=COLORS.get(m), marker="o", label=LABELS.get(m, m))
        axes[1].plot(sig, g / np.median(g), color=COLORS.get(m), marker="o", label=LABELS.get(m, m))
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set(title="importance ratio mean - 1 (off-policy; guard: RatioNorm's)", xlabel="sigma (1 = pure noise)")
    axes[1].set(title="per-timestep gradient norm / median", xlabel="sigma (1 = pure noise)", yscale="log")
    for ax in axes:
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"mean over {len(complete)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, files["per_timestep"]), dpi=110)
    plt.close(fig)
    return files


def _table(header: List[str], body: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def markdown(study: Dict, res: Dict, base: Dict, files: Dict[str, str], command: str) -> str:
    from .report import versions

    complete, methods, base_m = res["complete"], study["methods"], study["baseline"]
    n = len(complete)
    v = versions()
    v["machine"] = v["machine"].replace("torch threads 1", "torch threads 1 per run")
    walls = [r["value"] for r in res["rows"] if r["section"] == "run" and r["metric"] == "wall_s"]
    lines = ["# grpo-guard demo study: paired multi-seed comparison", "",
             f"- command: `{command}`",
             f"- written: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds with every run finished: "
             f"{n} of {len(study['rl_seeds'])} ({', '.join(map(str, complete)) or 'none'})"
             + (f"; **unfinished runs: {len(res['missing'])}** (this report is partial)" if res["missing"] else ""),
             f"- run wall time: {sum(walls):.0f} s over {len(walls)} runs (one CPU thread each)" if walls else "",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
             "## Design (fixed in `grpo_guard/demo/study.py` and `study_report.py` before the runs)", "",
             f"- Methods: {', '.join(methods)}; baseline `{base_m}`. Only `train.method` differs between the runs of a "
             f"seed; RL seeds {study['rl_seeds'][0]}..{study['rl_seeds'][-1]} change the LoRA initialisation, prompts "
             f"and rollout noise; the reward models and the evaluation set (80 images, the same noise for every "
             f"run) come from reward seed {study['run']['reward_seed']} and do not change.",
             f"- Primary metric: **gold at equal proxy**, paired difference method - {base_m}. {EQUAL_PROXY}",
             f"- Intervals: two-sided {CONFIDENCE:.0%} Student-t over seeds (n - 1 degrees of freedom), of the "
             f"per-seed values (per method) or of the per-seed paired differences. A method is called better or "
             f"worse only when the interval excludes 0.",
             "- Gold = mean of the two gold scores (kernel-classifier digit probability and nearest-neighbour realism), "
             f"each divided by the base model's (raw base: digit prob {base['raw']['digit_prob']:.4f}, realism "
             f"{base['raw']['realism']:.4f}); base proxy {base['raw']['proxy_logit']:.3f}.", ""]
    if n < 2:
        lines += ["Fewer than two seeds have every run finished: no statistics yet.", ""]
        return "\n".join(lines)
    lines += ["## Primary result", ""]
    for m in methods:
        if m != base_m:
            lines.append(f"- {LABELS.get(m, m)} - {LABELS.get(base_m, base_m)}, gold at equal proxy: "
                         + _verdict(m, PRIMARY, res["paired"], n) + ".")
    lines += ["", "## Paired differences against the baseline (mean [95 % t interval]; seeds where the method is "
              "better)", ""]
    body = []
    for key, label, better in METRICS:
        body.append([label + (f" ({better} is better)" if better != "-" else "")]
                    + [f"{_fmt(res['paired'][(m, key)][0])} [{_fmt(res['paired'][(m, key)][1])}, "
                       f"{_fmt(res['paired'][(m, key)][2])}]" + (f"; {res['paired'][(m, key)][3]}/{n}"
                                                                  if better != "-" else "")
                       for m in methods if m != base_m])
    lines += _table(["metric"] + [f"{m} - {base_m}" for m in methods if m != base_m], body) + [""]
    lines += ["## Per method (mean [95 % t interval] over seeds)", ""]
    body = []
    for key, label, _ in res["metrics"]:
        body.append([label] + [("-" if (m, key) not in res["summary"] else
                                f"{_fmt(res['summary'][(m, key)][0])} [{_fmt(res['summary'][(m, key)][1])}, "
                                f"{_fmt(res['summary'][(m, key)][2])}]") for m in methods])
    lines += _table(["metric"] + methods, body) + [""]
    lines += ["## Per seed", ""]
    levels = {r["seed"]: r["value"] for r in res["rows"] if r["section"] == "equal_proxy" and r["metric"] == "level"}
    cross = {(r["seed"], r["method"]): r["value"] for r in res["rows"]
             if r["section"] == "equal_proxy" and r["metric"] == "crossing_step"}
    body = [[str(s), _fmt(levels[s])]
            + [f"{_fmt(res['runs'][(s, m)][PRIMARY])} (step {cross[(s, m)]:.0f})" for m in methods]
            + [f"{_fmt(res['runs'][(s, m)]['final_proxy'])} / {_fmt(res['runs'][(s, m)]['final_gold'])}"
               for m in methods] for s in complete]
    lines += _table(["seed", "P*"] + [f"{m}: gold at P*" for m in methods]
                    + [f"{m}: final proxy / gold" for m in methods], body) + [""]
    lines += ["## Figures", "", f"![gold vs proxy]({files['gold_vs_proxy']})", "",
              f"![paired differences]({files['paired']})", "", f"![per-timestep diagnostics]({files['per_timestep']})",
              "", "## Files", "",
              "- `study.csv`: every number above (section, method, metric, statistic, seed, value).",
              "- `runs/s<seed>/<method>/`: each run's `eval.json` (evaluation-set scores every "
              f"{study['run']['eval_every']} steps), `metrics.jsonl` (the trainer's log, one line per step), "
              "TensorBoard logs.", "- `study.json`: the settings; `base.json`: the base model's evaluation.", "",
              "## Settings of every run", "", "```"]
    lines += [f"{k}: {val}" for k, val in study["run"].items() if k not in ("seed", "methods")] + ["```", ""]
    return "\n".join(lines)


def write(out: str, study: Dict, command: str) -> str:
    """Analyze the study in ``out`` and write STUDY.md, study.csv and the figures; returns STUDY.md's path."""
    with open(os.path.join(out, "base.json")) as f:
        base = json.load(f)
    res = analyze(out, study)
    files = figures(out, study, res, base) if len(res["complete"]) >= 2 else {}
    with open(os.path.join(out, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["section", "method", "metric", "statistic", "seed", "value"])
        w.writeheader()
        w.writerows(res["rows"])
    path = os.path.join(out, "STUDY.md")
    with open(path, "w") as f:
        f.write(markdown(study, res, base, files, command))
    return path
