"""Precision of the GRPO-Guard log-ratio log r_hat in float32 (SPEC §6): the published formula
``(log p_theta - log p_old + bias) * s`` vs grpo_guard's closed form ``mean_D[z * (mu_theta - mu_old)]``, each
against a float64 evaluation of the same float32 inputs, at every sigma of the SD3.5 10-step schedule.

Inputs per step: a real rollout in float64 rounded to float32 (x' = mu_old + s*z), and a policy change v - v_old in
a random direction scaled so that log r_hat is ``target`` per sample (:func:`.utils.perturb_for_log_ratio`). The
published formula is evaluated with the per-sample bias (the intended form; as published the bias is a batch mean,
which is a different quantity, not a rounding error). grpo_guard is evaluated from the rollout velocity
(``old_model_output``) and from the stored float32 old mean (``old_prev_sample_mean``, what sde_step returns).

    python -m grpo_guard.bench.precision [--shape sd35_512] [--targets 4e-7,2e-6,7e-6] [--wide]
    python benchmarks/precision.py ...     # the same, from a checkout
"""
from __future__ import annotations

import sys

import torch

import grpo_guard as gg
from grpo_guard import reference as ref

from .baselines import published_guard_log_ratio
from .utils import ALL_SHAPES, perturb_for_log_ratio, rollout_case, sd35_sigmas

NOISE_LEVEL = 0.7


def _errors(est, truth):
    err = (est.double() - truth).abs()
    return float((err / truth.abs()).max()), float(err.max())


def precision_table(shape="sd35_512", targets=(2e-6,), steps=None, seed=0):
    """Rows (dicts) with the max over the batch of |log r_hat - truth| / |truth| (and the absolute error) for the
    published float32 formula and grpo_guard in float32, per step of the SD3.5 schedule and target size."""
    latent_shape, B = ALL_SHAPES[shape]
    sigmas = sd35_sigmas()
    steps = range(len(sigmas) - 1) if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    rows = []
    with gg.backend("torch"):
        for i in steps:
            sig, nxt = sigmas[i], sigmas[i + 1]
            sig32 = torch.full((B,), sig, dtype=torch.float32)
            nxt32 = torch.full((B,), nxt, dtype=torch.float32)
            adv = torch.zeros(B)
            for target in targets:
                c = rollout_case(B, latent_shape, sig, nxt, dtype=torch.float32, generator=g)
                v_old, x, x_next = c["v_old"], c["x"], c["x_next"]
                v = perturb_for_log_ratio(v_old, x, x_next, sig, nxt, target, generator=g)
                _, stats64 = ref.policy_loss(v.double(), x.double(), x_next.double(), sig, nxt, adv.double(),
                                             old_model_output=v_old.double(), noise_level=NOISE_LEVEL,
                                             method="ratio_norm")
                truth = stats64["log_ratio"]
                published, _ = published_guard_log_ratio(v, v_old, x, x_next, sig32, nxt32, NOISE_LEVEL,
                                                         per_sample_bias=True)
                _, st_v = gg.policy_loss(v, x, x_next, sig, nxt, adv, old_model_output=v_old,
                                         noise_level=NOISE_LEVEL, method="ratio_norm")
                old_mean = gg.sde_step(v_old, x, sig, nxt, NOISE_LEVEL, prev_sample=x_next).prev_sample_mean
                _, st_m = gg.policy_loss(v, x, x_next, sig, nxt, adv, old_prev_sample_mean=old_mean,
                                         noise_level=NOISE_LEVEL, method="ratio_norm")
                pub_rel, pub_abs = _errors(published.detach(), truth)
                v_rel, v_abs = _errors(st_v["log_ratio"], truth)
                m_rel, m_abs = _errors(st_m["log_ratio"], truth)
                rows.append({"step": i, "sigma": sig, "target": target, "mean_abs_truth": float(truth.abs().mean()),
                             "published_rel": pub_rel, "published_abs": pub_abs,
                             "gg_old_velocity_rel": v_rel, "gg_old_velocity_abs": v_abs,
                             "gg_old_mean_rel": m_rel, "gg_old_mean_abs": m_abs})
    return rows


def format_precision(rows, shape="sd35_512"):
    latent_shape, B = ALL_SHAPES[shape]
    D = 1
    for n in latent_shape:
        D *= n
    lines = [f"log r_hat relative error vs float64, max over B={B} samples, D={D:,} (float32 inputs)",
             "| step | sigma | target log r_hat | published fp32 (abs err) | grpo_guard fp32, old velocity | "
             "grpo_guard fp32, old mean |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['sigma']:.4f} | {r['target']:.0e} | {r['published_rel']:.2e} "
                     f"({r['published_abs']:.1e}) | {r['gg_old_velocity_rel']:.1e} | {r['gg_old_mean_rel']:.1e} |")
    return "\n".join(lines)


def format_precision_wide(rows, shape="sd35_512"):
    """One line per step, one column per target: relative errors (max over the batch) of each method."""
    latent_shape, B = ALL_SHAPES[shape]
    targets = sorted({r["target"] for r in rows})
    by = {(r["step"], r["target"]): r for r in rows}
    steps = sorted({r["step"] for r in rows})
    head = ["step", "sigma"]
    for name in ("published fp32", "grpo_guard fp32, old velocity", "grpo_guard fp32, old mean"):
        head += [f"{name} @ {t:.0e}" for t in targets]
    lines = [f"max over B={B} samples of |log r_hat - float64| / |float64|, latent {latent_shape}",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i in steps:
        cells = [str(i), f"{by[(i, targets[0])]['sigma']:.4f}"]
        for key in ("published_rel", "gg_old_velocity_rel", "gg_old_mean_rel"):
            cells += [f"{by[(i, t)][key]:.1e}" for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="sd35_512", choices=list(ALL_SHAPES))
    parser.add_argument("--targets", default="4e-7,2e-6,7e-6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wide", action="store_true", help="one line per step, one column per target")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    targets = [float(t) for t in args.targets.split(",")]
    rows = precision_table(args.shape, targets, seed=args.seed)
    if args.wide:
        print(format_precision_wide(rows, args.shape))
    else:
        print(format_precision(sorted(rows, key=lambda r: (r["target"], r["step"])), args.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
