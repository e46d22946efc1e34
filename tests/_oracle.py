"""An oracle for SPEC §2-5 written independently of grpo_guard/reference.py (not a test module).

Float64 throughout, straight from SPEC's formulas, none of the reference's closed forms or algebra:
- the transition mean from SPEC §2's table as written (flow / dance: x(1 + std^2 dt/(2 sigma)) + v(1 + std^2
  (1 - sigma)/(2 sigma)) dt; cps: (x - sigma v)(1 - sigma') + (x + (1 - sigma) v) sqrt(sigma'^2 - s^2));
- log-probabilities as torch.distributions.Normal log-densities averaged over the latent dims (cps: -mean (x'-mu)^2);
- every log-ratio as a difference of those log-probabilities; the bias as mean (mu_theta - mu_old)^2/(2 s^2)
  (cps: its own scale); RatioNorm directly as mean_D[z (mu_theta - mu_old)], z = (x' - mu_old)/s;
- the loss as the plain PPO formula on the ratio itself: mean_i w_i max(-A r, -A clamp(r, 1 - eps, 1 + eps)),
  A clamped to +-adv_clip_max, w = 1/|dt| (beta/|dt|, beta the velocity gain d mu/(dt dv)) for "guard";
- the stats: mean and population std of r, the fraction with |r - 1| > eps, mean(log r^2)/2.
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Normal


def schedule_terms(sigma, sigma_next, eta, dynamics):
    """(std_dev_t, s, mean_fn) with mean_fn(x, v) -> mu, per sample, float64 (B, 1) columns."""
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    nxt = torch.as_tensor(sigma_next, dtype=torch.float64).reshape(-1, 1)
    dt = nxt - sig
    if dynamics == "cps":
        s = nxt * math.sin(eta * math.pi / 2)
        c = torch.sqrt(nxt ** 2 - s ** 2)

        def mean_fn(x, v):
            return (x - sig * v) * (1 - nxt) + (x + (1 - sig) * v) * c
        return s, s, mean_fn
    if dynamics == "flow":
        sig_tilde = torch.where(sig == 1, nxt, sig)
        std_dev_t = eta * torch.sqrt(sig / (1 - sig_tilde))
    else:
        std_dev_t = torch.full_like(sig, eta)
    s = std_dev_t * torch.sqrt(-dt)

    def mean_fn(x, v):
        return x * (1 + std_dev_t ** 2 / (2 * sig) * dt) + v * (1 + std_dev_t ** 2 * (1 - sig) / (2 * sig)) * dt
    return std_dev_t, s, mean_fn


def log_prob(xp, mu, s, dynamics):
    """mean over latent dims of log N(x'; mu, s^2) (cps: -mean (x'-mu)^2), (B,)."""
    if dynamics == "cps":
        return -((xp - mu) ** 2).mean(dim=1)
    return Normal(mu, s.expand_as(mu)).log_prob(xp).mean(dim=1)


def flat64(t):
    return t.detach().double().cpu().reshape(t.shape[0], -1) if t is not None else None


def means(v, x, xp, sigma, sigma_next, noise_level, dynamics, v_old=None, mu_old=None):
    """(xp, std_dev_t, s, mean_fn, mu, mu_old) in float64 (B, D): the new mean from ``v`` (a float64 CPU leaf keeps
    its gradient) and the old one from ``v_old`` (recomputed) or ``mu_old`` (stored), None without either."""
    B = x.shape[0]
    v = v if (v.dtype == torch.float64 and v.device.type == "cpu") else v.detach().double().cpu()
    v = v.reshape(B, -1)
    x, xp = flat64(x), flat64(xp)
    std_dev_t, s, mean_fn = schedule_terms(sigma, sigma_next, noise_level, dynamics)
    mu_o = mean_fn(x, flat64(v_old)) if v_old is not None else flat64(mu_old)
    return xp, std_dev_t, s, mean_fn, mean_fn(x, v), mu_o


def policy_loss(v, x, xp, sigma, sigma_next, advantages, *, v_old=None, mu_old=None, old_log_prob=None,
                noise_level=0.7, dynamics="flow", method="guard", clip_range=2e-6, adv_clip_max=5.0,
                guard_weight="dt"):
    """(loss, stats, per-sample log-ratio) of SPEC §4-5 in float64 on the CPU. ``v`` may require grad (float64
    CPU leaf) for the gradient; the old policy is ``v_old`` (its mean recomputed) or ``mu_old`` (stored) or
    ``old_log_prob`` (grpo only)."""
    xp, std_dev_t, s, mean_fn, mu, mu_o = means(v, x, xp, sigma, sigma_next, noise_level, dynamics, v_old, mu_old)
    lp = log_prob(xp, mu, s, dynamics)
    if mu_o is not None:
        plain = lp - log_prob(xp, mu_o, s, dynamics)
        delta = mu - mu_o
        scale = 1.0 if dynamics == "cps" else 2 * s.reshape(-1) ** 2  # cps: log p = -mean d^2, variance 1/2
        bias = (delta ** 2).mean(dim=1) / scale
        normed = (((xp - mu_o) / s) * delta).mean(dim=1)
        lr = {"grpo": plain, "mean_revised": plain + bias, "ratio_norm": normed, "guard": normed}[method]
    else:
        lr = lp - torch.as_tensor(old_log_prob, dtype=torch.float64).cpu()
    A = torch.as_tensor(advantages, dtype=torch.float64).cpu().clamp(-adv_clip_max, adv_clip_max)
    r = torch.exp(lr)
    dt = (torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma, dtype=torch.float64)).reshape(-1)
    if method == "guard":
        w = 1.0 / dt.abs()
        if guard_weight == "beta_dt":
            # beta = d mu / d v / dt: the velocity gain, read off the mean function
            beta = (mean_fn(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
                    .reshape(-1) / dt)
            w = w * beta
    else:
        w = torch.ones(1, dtype=torch.float64)
    per = torch.maximum(-A * r, -A * torch.clamp(r, 1 - clip_range, 1 + clip_range)) * w
    rd = r.detach()
    stats = {"ratio_mean": rd.mean(), "ratio_std": rd.std(unbiased=False),
             "clipfrac": ((rd - 1).abs() > clip_range).double().mean(),
             "approx_kl": 0.5 * (lr.detach() ** 2).mean(), "log_ratio": lr.detach()}
    return per.mean(), stats


def dppo_loss(v, x, xp, sigma, sigma_next, advantages, *, v_old=None, mu_old=None, noise_level=0.7,
              dynamics="flow", kl_threshold=1e-5, adv_clip_max=5.0):
    """Flow-DPPO (SPEC §9) in float64 on the CPU: log r as a difference of direct log-densities, K as
    torch.distributions' KL between the old and new Normal transitions averaged over the latent dims, the mask
    (K >= tau and A log r > 0) and mean_i -A_i r_i (1 - drop_i). Returns (loss, stats)."""
    from torch.distributions import kl_divergence

    xp, _, s, _, mu, mu_o = means(v, x, xp, sigma, sigma_next, noise_level, dynamics, v_old, mu_old)
    lr = log_prob(xp, mu, s, dynamics) - log_prob(xp, mu_o, s, dynamics)
    K = kl_divergence(Normal(mu_o, s.expand_as(mu_o)), Normal(mu.detach(), s.expand_as(mu))).mean(dim=1)
    A = torch.as_tensor(advantages, dtype=torch.float64).cpu().clamp(-adv_clip_max, adv_clip_max)
    drop = (K >= kl_threshold) & (A * lr.detach() > 0)
    loss = (-A * torch.exp(lr) * (~drop).double()).mean()
    d = drop.double()
    stats = {"kl_mean": K.mean(), "kl_max": K.max(), "masked_fraction": d.mean(),
             "masked_fraction_pos": d[A > 0].mean() if (A > 0).any() else torch.zeros((), dtype=torch.float64),
             "masked_fraction_neg": d[A < 0].mean() if (A < 0).any() else torch.zeros((), dtype=torch.float64),
             "log_ratio": lr.detach(), "kl": K, "drop": drop}
    return loss, stats
