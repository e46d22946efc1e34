"""Baselines for the benchmarks: the published eager formulas, written the way Flow-GRPO writes them.

These are NOT this project's reference (that is :mod:`grpo_guard.reference`, the one implementation of SPEC.md);
they exist to be compared against, for speed and for precision. Our own restatement of the math of
yifan123/flow_grpo:

- ``published_sde_step``: the ``sde`` branch of ``sde_step_with_logprob``
  (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): every input cast to float32, per-sample sigma broadcast
  as (B, 1, ..., 1), ``log p = mean_D[-(x'-mu)^2/(2 s^2) - log s - log sqrt(2 pi)]``.
- ``published_guard_loss``: the GRPO-Guard policy loss of the published training script
  (scripts/train_sd3_GRPO_Guard.py): log p under theta and under the old policy (no grad), the ratio-mean bias
  ``mean (mu_theta - mu_old)^2 / (2 (mean sqrt(-dt) * mean std_dev_t)^2)``, the scaled ratio
  ``exp((log p - log p_old + bias) * mean sqrt(-dt) * mean std_dev_t)``, the clipped surrogate, divided by
  ``mean(sqrt(-dt))^2 = |dt|``. As published, the bias is reduced over an empty dim tuple, i.e. over the whole
  micro-batch (SPEC §5: a confirmed bug); ``per_sample_bias=True`` gives the intended per-sample form.

Both take sigma / sigma_next as (B,) float32 tensors on the latents' device (Flow-GRPO reads them from the
scheduler's float32 ``sigmas``). The sigma == 1 guard uses sigma_next, which is the scheduler's ``sigmas[1]``
whenever sigma == 1 (step 0).
"""
from __future__ import annotations

import math

import torch

from .utils import compiled


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def published_sde_step(model_output, sample, sigma, sigma_next, noise_level=0.7, prev_sample=None, noise=None):
    """Flow-GRPO's eager SDE step ("sde" type) in float32. Returns (prev_sample, log_prob, mean, std_dev_t)."""
    v = model_output.float()
    x = sample.float()
    sig = _per_sample(sigma.float(), x)
    sig_next = _per_sample(sigma_next.float(), x)
    dt = sig_next - sig
    std_dev_t = torch.sqrt(sig / (1 - torch.where(sig == 1, sig_next, sig))) * noise_level
    mean = x * (1 + std_dev_t ** 2 / (2 * sig) * dt) + v * (1 + std_dev_t ** 2 * (1 - sig) / (2 * sig)) * dt
    if prev_sample is None:
        prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std_dev_t


def published_rollout_step(model_output, sample, sigma, sigma_next, noise_level=0.7, noise=None):
    """A rollout step as a sampling loop uses it: :func:`published_sde_step` with x' stored in the latents' dtype,
    keeping (prev_sample, log_prob) only (so torch.compile need not write the float32 mean)."""
    prev_sample, log_prob, _, _ = published_sde_step(model_output, sample, sigma, sigma_next, noise_level,
                                                     noise=noise)
    return prev_sample.to(sample.dtype), log_prob


def published_guard_log_ratio(model_output, old_model_output, sample, prev_sample, sigma, sigma_next,
                              noise_level=0.7, per_sample_bias=False):
    """The exponent of the published GRPO-Guard ratio, ``(log p - log p_old + bias) * sqrt(-dt) * std_dev_t``
    (batch means of both factors, as published), and sqrt(-dt). float32."""
    _, log_prob, mean, std_dev_t = published_sde_step(model_output, sample, sigma, sigma_next, noise_level,
                                                      prev_sample=prev_sample)
    with torch.no_grad():
        _, old_log_prob, old_mean, _ = published_sde_step(old_model_output, sample, sigma, sigma_next, noise_level,
                                                          prev_sample=prev_sample)
    sqrt_dt = _per_sample(torch.sqrt(sigma.float() - sigma_next.float()), mean)
    sigma_t = std_dev_t.mean()
    dims = tuple(range(1, mean.ndim)) if per_sample_bias else tuple(range(1, log_prob.ndim))  # published: ()
    bias = (mean - old_mean).pow(2).mean(dim=dims)
    bias = bias / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
    return (log_prob - old_log_prob + bias) * (sqrt_dt.mean() * sigma_t), sqrt_dt


def published_guard_loss(model_output, old_model_output, sample, prev_sample, sigma, sigma_next, advantages,
                         noise_level=0.7, clip_range=2e-6, adv_clip_max=5.0, per_sample_bias=False):
    """The published GRPO-Guard policy loss of one timestep (KL off), float32, a 0-dim tensor."""
    log_ratio, sqrt_dt = published_guard_log_ratio(model_output, old_model_output, sample, prev_sample, sigma,
                                                   sigma_next, noise_level, per_sample_bias)
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    return policy_loss / (sqrt_dt.mean() ** 2)


_COMPILED = {}


def compiled_baseline(name: str):
    """torch.compile of a baseline above, built once per process: "sde_step", "rollout_step" or "guard_loss"."""
    if name not in _COMPILED:
        fn = {"sde_step": published_sde_step, "rollout_step": published_rollout_step,
              "guard_loss": published_guard_loss}[name]
        _COMPILED[name] = compiled(fn)
    return _COMPILED[name]
