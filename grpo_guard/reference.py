"""The one PyTorch implementation of SPEC.md: every formula of the project lives here.

Kernels (Triton, CUDA) and the trainer are tested against these functions; the ``torch`` backend *is*
these functions. Everything is float64-capable: call them on float64 tensors to get an oracle.

Notation (SPEC §1-2), per sample i, elementwise over the D latent dims:
    v   model_output (velocity, after CFG)      x   sample (current latent, at sigma)
    x'  prev_sample (next latent, at sigma')     dt  = sigma' - sigma  (< 0)
    mu  = a*x + b*v                               s   transition std, x' = mu + s*z

Compute dtype: float64 when any input is float64, float32 otherwise (bf16/fp16 inputs are upcast; they
overflow otherwise). Per-sample coefficients are always derived in float64 and cast once.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

DYNAMICS = ("flow", "dance", "cps")
METHODS = ("grpo", "mean_revised", "ratio_norm", "guard", "dppo")
GUARD_WEIGHTS = ("dt", "beta_dt")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

Sigma = Union[float, torch.Tensor]


class StepCoefficients(NamedTuple):
    """Per-sample constants of one SDE step, each a float64 tensor of shape (B,) (or (1,) if shared).

    std_dev_t  the schedule's noise scale (flow: eta*sqrt(sigma/(1-sigma~)); dance: eta; cps: s)
    std        the transition std s (flow/dance: std_dev_t*sqrt(-dt); cps: sigma'*sin(eta*pi/2))
    a, b       mu = a*x + b*v
    beta       b / dt (the velocity gain; flow: 1 + eta^2/2 for sigma < 1)
    dt         sigma' - sigma
    """

    std_dev_t: torch.Tensor
    std: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    beta: torch.Tensor
    dt: torch.Tensor


def step_coefficients(sigma: Sigma, sigma_next: Sigma, noise_level: float, dynamics: str) -> StepCoefficients:
    """SPEC §2 table. ``sigma``/``sigma_next``: floats or 1-D tensors; returns float64 tensors.

    flow:  std_dev_t = eta*sqrt(sigma/(1-sigma~)), sigma~ = sigma' at sigma == 1 (the sigma = 1 guard)
           s = std_dev_t*sqrt(-dt);  a = 1 + std_dev_t^2*dt/(2 sigma);  b = (1 + std_dev_t^2*(1-sigma)/(2 sigma))*dt
    dance: the same with std_dev_t = eta
    cps:   s = sigma'*sin(eta*pi/2); c = sqrt(sigma'^2 - s^2)
           mu = (x - sigma v)(1-sigma') + (x + (1-sigma) v)*c  =>  a = (1-sigma') + c,  b = (1-sigma)c - sigma(1-sigma')
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    nxt = torch.as_tensor(sigma_next, dtype=torch.float64).reshape(-1)
    if nxt.device != sig.device:
        nxt = nxt.to(sig.device)
    sig, nxt = torch.broadcast_tensors(sig, nxt)
    dt = nxt - sig
    eta = float(noise_level)
    if dynamics in ("flow", "dance"):
        if dynamics == "flow":
            sig_tilde = torch.where(sig == 1.0, nxt, sig)
            std_dev_t = eta * torch.sqrt(sig / (1.0 - sig_tilde))
        else:
            std_dev_t = torch.full_like(sig, eta)
        var = std_dev_t * std_dev_t
        std = std_dev_t * torch.sqrt(-dt)
        a = 1.0 + var * dt / (2.0 * sig)
        beta = 1.0 + var * (1.0 - sig) / (2.0 * sig)
        b = beta * dt
    elif dynamics == "cps":
        std = nxt * math.sin(eta * math.pi / 2.0)
        std_dev_t = std
        c = torch.sqrt(torch.clamp(nxt * nxt - std * std, min=0.0))  # >= 0 in exact arithmetic
        a = (1.0 - nxt) + c
        b = (1.0 - sig) * c - sig * (1.0 - nxt)
        beta = b / dt
    else:
        raise ValueError(f"dynamics must be one of {DYNAMICS}, got {dynamics!r}")
    return StepCoefficients(std_dev_t, std, a, b, beta, dt)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (SPEC §2: float32 or better)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (1,) coefficient -> (B, 1) in ``like``'s dtype/device, for broadcasting over flat (B, D)."""
    return c.to(device=like.device, dtype=like.dtype).reshape(-1, 1)


def transition_mean(model_output: torch.Tensor, sample: torch.Tensor, coef: StepCoefficients,
                    dtype: torch.dtype) -> torch.Tensor:
    """mu = a*x + b*v as flat (B, D) in ``dtype``. The one expression every backend must reproduce bit for bit
    between rollout and training, so that the on-policy ratio is exactly 1."""
    x = sample.reshape(sample.shape[0], -1).to(dtype)
    v = model_output.reshape(model_output.shape[0], -1).to(dtype)
    return _per_sample(coef.a, x) * x + _per_sample(coef.b, x) * v


def log_prob_from_mean(prev_sample_flat: torch.Tensor, mean: torch.Tensor, coef: StepCoefficients,
                       dynamics: str) -> torch.Tensor:
    """log p(x' | mu), shape (B,), the MEAN over latent dims (SPEC §2).

    flow/dance: mean_D[-(x'-mu)^2/(2 s^2)] - log s - log sqrt(2 pi);  cps: -mean_D[(x'-mu)^2].
    """
    sq = (prev_sample_flat - mean).square().mean(dim=1)
    if dynamics == "cps":
        return -sq
    s = coef.std.to(device=mean.device, dtype=mean.dtype)
    return -sq / (2.0 * s * s) - torch.log(s) - LOG_SQRT_2PI


class SDEStep(NamedTuple):
    """What one SDE step returns. prev_sample: sample's dtype and shape; log_prob: (B,) in the compute
    dtype; prev_sample_mean: sample's shape in the compute dtype (float32 for bf16 inputs, so the
    on-policy ratio can be exact), or None when not asked for; std_dev_t: (B,) float64-derived, in the
    compute dtype."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev_t: torch.Tensor


def sde_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma, *,
             noise_level: float = 0.7, dynamics: str = "flow", prev_sample: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, return_mean: bool = True) -> SDEStep:
    """One SDE step and its log-probability (SPEC §2). Differentiable w.r.t. model_output and sample.

    Rollout (``prev_sample`` None): x' = mu + s*noise, stored in ``sample.dtype``; the log-prob is that of
    the stored (rounded) x', treated as a constant. Training: give ``prev_sample`` to score it.
    ``noise`` must be given for a rollout (the public API draws it). ``return_mean=False``: prev_sample_mean
    is None (the kernels then skip writing it).
    """
    B = sample.shape[0]
    cd = compute_dtype(model_output, sample, prev_sample)
    coef = step_coefficients(sigma, sigma_next, noise_level, dynamics)
    mean = transition_mean(model_output, sample, coef, cd)
    if prev_sample is None:
        if noise is None:
            raise ValueError("noise is required when prev_sample is None")
        z = noise.reshape(B, -1).to(cd)
        new = mean + _per_sample(coef.std, mean) * z
        prev_out = new.to(sample.dtype).reshape(sample.shape)
    else:
        prev_out = prev_sample
    xp = prev_out.detach().reshape(B, -1).to(cd)
    log_prob = log_prob_from_mean(xp, mean, coef, dynamics)
    std_dev_t = coef.std_dev_t.to(device=sample.device, dtype=cd).expand(B).clone()
    return SDEStep(prev_out, log_prob, mean.reshape(sample.shape) if return_mean else None, std_dev_t)


# ----------------------------------------------------------------------------------------------------------
# Policy loss (SPEC §4-6)
# ----------------------------------------------------------------------------------------------------------

def policy_change(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: torch.Tensor,
                  coef: StepCoefficients, dtype: torch.dtype, *,
                  old_prev_sample_mean: Optional[torch.Tensor] = None,
                  old_model_output: Optional[torch.Tensor] = None):
    """The two closed-form sums every ratio is built from, per sample (SPEC §5-6), as (B,) tensors:

        S1 = mean_D[u * Delta],  S2 = mean_D[Delta^2],  u = x' - mu_old = s*z,  Delta = mu_theta - mu_old

    With ``old_model_output`` (exact and cheapest: Delta = b*(v - v_old), no rounding of mu enters);
    with ``old_prev_sample_mean``, Delta = mu_theta - mu_old where mu_theta is :func:`transition_mean`
    (bit-identical to what sde_step returned, so Delta == 0 on-policy).
    """
    B = sample.shape[0]
    xp = prev_sample.reshape(B, -1).to(dtype)
    if old_model_output is not None:
        v = model_output.reshape(B, -1).to(dtype)
        v_old = old_model_output.reshape(B, -1).to(dtype)
        mean_old = transition_mean(old_model_output, sample, coef, dtype)
        delta = _per_sample(coef.b, v) * (v - v_old)
    else:
        mean_old = old_prev_sample_mean.reshape(B, -1).to(dtype)
        delta = transition_mean(model_output, sample, coef, dtype) - mean_old
    u = xp - mean_old
    return (u * delta).mean(dim=1), delta.square().mean(dim=1)


def log_ratios(s1: torch.Tensor, s2: torch.Tensor, std: torch.Tensor, dynamics: str):
    """From the sums of :func:`policy_change` to the methods' log-ratios, each (B,):

        flow/dance: log r = (S1 - S2/2)/s^2,  bias = S2/(2 s^2)
        cps (log p = -mean (x'-mu)^2, a Gaussian of variance 1/2): log r = 2 S1 - S2,  bias = S2
        mean_revised = log r + bias;   ratio_norm = guard = mean_D[z*Delta] = S1/s   (z = u/s)

    Returns dict(grpo=..., mean_revised=..., ratio_norm=..., guard=..., bias=...).
    """
    if dynamics == "cps":
        plain, bias = 2.0 * s1 - s2, s2
    else:
        var = std * std
        plain, bias = (s1 - 0.5 * s2) / var, s2 / (2.0 * var)
    normed = s1 / std
    return {"grpo": plain, "mean_revised": plain + bias, "ratio_norm": normed, "guard": normed, "bias": bias}


def clip_bounds(clip_range: float):
    """(log(1-eps), log(1+eps)) in float64: clip decisions are made on log-ratios (SPEC §6)."""
    return math.log1p(-clip_range), math.log1p(clip_range)


def sample_weights(coef: StepCoefficients, method: str, guard_weight: str = "dt") -> torch.Tensor:
    """Cross-step reweighting (SPEC §5): 1/|dt| for "guard" ("beta_dt": beta/|dt|, the DanceGRPO note),
    1 for the other methods. float64, (B,) or (1,)."""
    if method != "guard":
        return torch.ones_like(coef.dt)
    w = 1.0 / coef.dt.abs()
    return w * coef.beta if guard_weight == "beta_dt" else w


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                      clip_range: float, adv_clip_max: float):
    """loss = mean_i w_i * max(-A_i r_i, -A_i clip(r_i, 1-eps, 1+eps)), A clamped to +-adv_clip_max.

    The clip is applied to the log-ratio against log(1 +- eps), so the decision is exact even where a
    float32 ratio near 1 cannot resolve eps. Returns (loss, per-sample loss, ratio, clipped mask).
    """
    lo, hi = clip_bounds(clip_range)
    adv = advantages.to(log_ratio.dtype).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    ratio_c = torch.exp(log_ratio.clamp(lo, hi))
    per_sample = torch.maximum(-adv * ratio, -adv * ratio_c) * weights.to(log_ratio.dtype)
    clipped = (log_ratio > hi) | (log_ratio < lo)
    return per_sample.mean(), per_sample, ratio, clipped


def step_kl(s2: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-DPPO's exact per-step KL (SPEC §9), per sample: K = mean_D[Delta^2] / (2 s^2) = S2 / (2 s^2), the KL
    between the old and new Gaussian transitions (same std s) per latent element; every dynamics (for cps s =
    sigma' sin(eta pi/2))."""
    return s2 / (2.0 * std * std)


def masked_surrogate(log_ratio: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor, kl_threshold: float,
                     adv_clip_max: float):
    """Flow-DPPO (SPEC §9): loss = mean_i -A_i r_i (1 - drop_i), drop_i = (K_i >= tau) and (A_i log r_i > 0):
    no clipping, no reweighting; drop is a detached gate (no gradient through K), decided on the exact log r.
    A clamped to +-adv_clip_max (the official code does not clamp: pass inf). Returns (loss, per-sample loss,
    ratio, dropped mask)."""
    adv = advantages.to(log_ratio.dtype).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    drop = (kl.detach() >= kl_threshold) & (adv * log_ratio.detach() > 0)
    per_sample = torch.where(drop, torch.zeros_like(ratio), -adv * ratio)
    return per_sample.mean(), per_sample, ratio, drop


def policy_loss(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: torch.Tensor, sigma: Sigma,
                sigma_next: Sigma, advantages: torch.Tensor, *, old_log_prob: Optional[torch.Tensor] = None,
                old_prev_sample_mean: Optional[torch.Tensor] = None,
                old_model_output: Optional[torch.Tensor] = None, noise_level: float = 0.7,
                dynamics: str = "flow", method: str = "guard", clip_range: float = 2e-6,
                adv_clip_max: float = 5.0, guard_weight: str = "dt", kl_threshold: float = 1e-5):
    """The clipped policy loss of one trained timestep (SPEC §4-5). Returns (loss, stats).

    log-ratio by method ("grpo": log r; "mean_revised": log r + bias; "ratio_norm"/"guard": s*(log r + bias)
    = mean_D[z*(mu_theta - mu_old)]), from closed forms whenever an old mean or velocity is given. Plain
    "grpo" with only ``old_log_prob`` uses log p_theta - old_log_prob (the published formula; exact
    on-policy, but it loses ~1e-7 absolute to cancellation in float32).
    "dppo" (Flow-DPPO, SPEC §9): the plain log r, masked by the exact per-step KL (:func:`masked_surrogate`);
    ``clip_range`` and ``guard_weight`` are unused; stats add kl_mean, kl_max, masked_fraction (= clipfrac) and
    masked_fraction_pos / _neg (among samples with A > 0 / A < 0).
    stats: detached ratio_mean, ratio_std, clipfrac, approx_kl (0-dim) and log_ratio, bias (B,).
    """
    B = sample.shape[0]
    cd = compute_dtype(model_output, sample, prev_sample, old_prev_sample_mean, old_model_output)
    coef = step_coefficients(sigma, sigma_next, noise_level, dynamics)
    std = coef.std.to(device=sample.device, dtype=cd)
    if old_model_output is not None or old_prev_sample_mean is not None:
        s1, s2 = policy_change(model_output, sample, prev_sample, coef, cd,
                               old_prev_sample_mean=old_prev_sample_mean, old_model_output=old_model_output)
        ratios = log_ratios(s1, s2, std, dynamics)
        log_ratio, bias = ratios["grpo" if method == "dppo" else method], ratios["bias"]
    else:
        mean = transition_mean(model_output, sample, coef, cd)
        log_p = log_prob_from_mean(prev_sample.reshape(B, -1).to(cd), mean, coef, dynamics)
        log_ratio = log_p - old_log_prob.to(cd)
        bias = None  # unknown without the old mean
    log_ratio = log_ratio.expand(B) if log_ratio.shape[0] != B else log_ratio
    if method == "dppo":
        kl = step_kl(s2, std).expand(B)
        loss, _, _, dropped = masked_surrogate(log_ratio, kl, advantages, kl_threshold, adv_clip_max)
        stats = summarize(log_ratio, dropped, bias)
        stats.update(kl_stats(kl, dropped, advantages))
        return loss, stats
    weights = sample_weights(coef, method, guard_weight).to(sample.device)
    loss, _, _, clipped = clipped_surrogate(log_ratio, advantages, weights, clip_range, adv_clip_max)
    stats = summarize(log_ratio, clipped, bias)
    return loss, stats


DPPO_STATS = ("kl_mean", "kl_max", "masked_fraction", "masked_fraction_pos", "masked_fraction_neg")


def kl_stats(kl: torch.Tensor, dropped: torch.Tensor, advantages: torch.Tensor):
    """Flow-DPPO's logged statistics, detached 0-dim: kl_mean, kl_max, masked_fraction, and the masked fraction
    among samples with a positive / negative advantage (0 when there are none)."""
    kl, d = kl.detach(), dropped.to(kl.dtype)
    pos, neg = (advantages > 0).to(kl.dtype), (advantages < 0).to(kl.dtype)
    return {"kl_mean": kl.mean(), "kl_max": kl.max(), "masked_fraction": d.mean(),
            "masked_fraction_pos": (d * pos).sum() / pos.sum().clamp(min=1),
            "masked_fraction_neg": (d * neg).sum() / neg.sum().clamp(min=1)}


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """KL(p_theta || p_ref) of one step per sample (SPEC §4): mean_D (mu_theta - mu_ref)^2 / (2 std_dev_t^2), (B,).

    ``std_dev_t`` is the schedule's noise scale of SPEC §2 (what :func:`sde_step` returns), not the transition
    std s = std_dev_t*sqrt(-dt): the published Flow-GRPO KL divides by std_dev_t^2."""
    B = mean.shape[0]
    diff = mean.reshape(B, -1) - mean_ref.reshape(B, -1).to(mean.dtype)
    std = std_dev_t.to(device=mean.device, dtype=mean.dtype).reshape(-1)
    return diff.square().mean(dim=1) / (2.0 * std * std)


def summarize(log_ratio: torch.Tensor, clipped: torch.Tensor, bias: Optional[torch.Tensor]):
    """The logged statistics (SPEC §4), all detached: ratio mean/std (population), clip fraction,
    approx KL = mean(log r^2)/2 of the method's log-ratio, and per sample log_ratio and bias (when known)."""
    lr = log_ratio.detach()
    excess = torch.expm1(lr)  # r - 1 without the 1.2e-7 resolution of a float32 ratio near 1
    stats = {
        "ratio_mean": 1.0 + excess.mean(),
        "ratio_std": excess.std(unbiased=False),
        "clipfrac": clipped.to(lr.dtype).mean(),
        "approx_kl": 0.5 * lr.square().mean(),
        "log_ratio": lr,
    }
    if bias is not None:
        stats["bias"] = bias.detach()
    return stats


# ----------------------------------------------------------------------------------------------------------
# Group-relative advantages (SPEC §3)
# ----------------------------------------------------------------------------------------------------------

def group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """Each element's group as an index in [0, number of groups), groups numbered in increasing id order:
    a stable sort, a cumulative count of id changes, scattered back. Same result as torch.unique's inverse,
    without its data-dependent output size (which costs a host sync on a GPU)."""
    order = torch.argsort(group_ids, stable=True)
    ids = group_ids[order]
    new = torch.ones_like(ids, dtype=torch.bool)
    new[1:] = ids[1:] != ids[:-1]
    return torch.empty_like(order).scatter_(0, order, torch.cumsum(new, 0) - 1)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g(r)) / (std + eps), population std; std of the group, or of the whole batch with
    ``global_std``. ``group_ids``: integer tensor (N,). Computed in float64, returned in float32 (float64
    for float64 rewards). Groups are numbered by sorting the ids (no data-dependent shapes: no host sync)."""
    r = rewards.to(torch.float64)
    inverse = group_index(group_ids)
    zeros = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)  # at most N groups
    n = zeros.index_add(0, inverse, torch.ones_like(r))
    sums = zeros.index_add(0, inverse, r)
    mean = (sums / n.clamp(min=1))[inverse]  # clamp: empty slots of the N-long buffers are never read
    centered = r - mean
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        sq = zeros.index_add(0, inverse, centered.square())
        std = torch.sqrt(sq / n.clamp(min=1))[inverse]
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return (centered / (std + eps)).to(out_dtype)
