"""The demo's PNG figures (matplotlib, Agg backend): rewards over steps, importance ratios per timestep,
per-timestep gradient-norm spread, and sample grids."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

COLORS = {"grpo": "tab:red", "guard": "tab:blue", "mean_revised": "tab:orange", "ratio_norm": "tab:green"}
LABELS = {"grpo": "Flow-GRPO (grpo)", "guard": "GRPO-Guard (guard)", "mean_revised": "mean-revised only",
          "ratio_norm": "RatioNorm only"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_timestep(records: List[Dict], key: str, off_policy_only: bool = True):
    """(sigmas, mean over steps and updates of ``key`` per trained timestep). ``off_policy_only`` skips each
    step's first update, whose ratio is exactly 1 by construction."""
    rows: Dict[int, list] = {}
    sig: Dict[int, float] = {}
    for r in records:
        ups = r["updates"][1:] if off_policy_only and len(r["updates"]) > 1 else r["updates"]
        for u in ups:
            for t in u["timesteps"]:
                rows.setdefault(t["index"], []).append(t[key])
                sig[t["index"]] = t["sigma"]
    idx = sorted(rows)
    return np.array([sig[i] for i in idx]), np.array([np.mean(rows[i]) for i in idx])


def rewards_plot(path: str, runs: Dict[str, Dict], base: Dict) -> None:
    """Proxy (left) and gold (right; mean of the two normalized golds, base = 1) over steps per method:
    thick lines = the fixed evaluation set, thin = the training rollouts."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, run in runs.items():
        c = COLORS.get(m, None)
        steps = sorted(run["evals"])
        ev = [run["evals"][k] for k in steps]
        tr_steps = [r["step"] for r in run["records"]]
        axes[0].plot(tr_steps, [r["reward/proxy_mean"] for r in run["records"]], color=c, alpha=0.25, lw=1)
        axes[0].plot(steps, [e["proxy_logit"] for e in ev], color=c, lw=2.2, marker="o", ms=3, label=LABELS.get(m, m))
        gtr = [(r["reward/gold/digit_prob_mean"] + r["reward/gold/realism_mean"]) / 2 for r in run["records"]]
        axes[1].plot(tr_steps, gtr, color=c, alpha=0.25, lw=1)
        axes[1].plot(steps, [e["gold"] for e in ev], color=c, lw=2.2, marker="o", ms=3, label=LABELS.get(m, m))
        axes[2].plot(steps, [e["digit_prob"] for e in ev], color=c, lw=2, ls="-", label=f"{m}: digit prob")
        axes[2].plot(steps, [e["realism"] for e in ev], color=c, lw=2, ls="--", label=f"{m}: realism")
    axes[0].axhline(base["scores"]["proxy_logit"], color="gray", lw=0.8, ls=":")
    for ax in axes[1:]:
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[0].set(title="proxy reward (optimized): linear-classifier logit", xlabel="step")
    axes[1].set(title="gold (never optimized), base = 1.00", xlabel="step")
    axes[2].set(title="gold components (eval set)", xlabel="step")
    _save(plt, fig, path, axes)


def ratio_plot(path: str, runs: Dict[str, Dict]) -> None:
    """Importance-ratio mean and std per trained timestep (off-policy updates), per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, run in runs.items():
        c = COLORS.get(m, None)
        sig, mean = per_timestep(run["records"], "ratio_mean")
        _, std = per_timestep(run["records"], "ratio_std")
        axes[0].plot(sig, mean - 1, color=c, marker="o", label=LABELS.get(m, m))
        axes[1].plot(sig, std, color=c, marker="o", label=LABELS.get(m, m))
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set(title="importance ratio mean - 1 (per timestep)", xlabel="sigma (1 = pure noise)")
    axes[1].set(title="importance ratio std (per timestep)", xlabel="sigma (1 = pure noise)", yscale="log")
    for ax in axes:
        ax.invert_xaxis()
    _save(plt, fig, path, axes)


def grad_norm_plot(path: str, runs: Dict[str, Dict]) -> Dict[str, float]:
    """Each trained timestep's own gradient norm (mean over all updates), normalized by its median, per
    method; returns each method's spread (max / min over timesteps)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    spreads = {}
    for m, run in runs.items():
        sig, g = per_timestep(run["records"], "grad_norm", off_policy_only=False)
        spreads[m] = float(g.max() / max(g.min(), 1e-30))
        ax.plot(sig, g / np.median(g), color=COLORS.get(m, None), marker="o",
                label=f"{LABELS.get(m, m)}: max/min = {spreads[m]:.1f}x")
    ax.set(title="per-timestep gradient norm / median", xlabel="sigma (1 = pure noise)", yscale="log")
    ax.invert_xaxis()
    _save(plt, fig, path, [ax])
    return spreads


def sample_grid(path: str, base_images, runs: Dict[str, Dict], per_digit: int, columns: int = 2) -> None:
    """Rows: the base model, then each method at a few evaluation steps; each row shows ``columns`` samples of
    every digit 0-9 (the same noise in every row)."""
    plt = _plt()
    rows = [("base", base_images)]
    for m, run in runs.items():
        steps = sorted(run["images"])
        pick = sorted({steps[len(steps) // 2], steps[-1]} - {0})
        rows += [(f"{m} @ {k}", run["images"][k]) for k in pick]
    n_img = 10 * columns
    fig, axes = plt.subplots(len(rows), 1, figsize=(n_img * 0.45, len(rows) * 0.62 + 0.2))
    axes = np.atleast_1d(axes)
    for ax, (label, imgs) in zip(axes, rows):
        sel = [d * per_digit + j for d in range(10) for j in range(columns)]
        strip = np.concatenate([np.pad(imgs[i, 0].numpy(), 1, constant_values=0.0) for i in sel], axis=1)
        ax.imshow(strip, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    _save(plt, fig, path)


def write_all(out: str, runs: Dict[str, Dict], base: Dict, per_digit: int) -> Dict[str, object]:
    """Write every figure into ``out``; returns {"files": [...], "grad_spread": {...}}."""
    files = {"rewards": "rewards.png", "ratio": "ratio_per_timestep.png", "grad": "grad_norm_per_timestep.png",
             "samples": "samples.png"}
    rewards_plot(os.path.join(out, files["rewards"]), runs, base)
    ratio_plot(os.path.join(out, files["ratio"]), runs)
    spreads = grad_norm_plot(os.path.join(out, files["grad"]), runs)
    sample_grid(os.path.join(out, files["samples"]), base["images"], runs, per_digit)
    return {"files": files, "grad_spread": spreads}


def _save(plt, fig, path: str, legend_axes=()) -> None:
    """Legend and grid on ``legend_axes``, then the common layout, a 110-dpi PNG, and the figure closed."""
    for ax in legend_axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
