"""The public functional API: validate, dispatch to a backend, return. No formula lives here."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import dispatch
from . import reference as ref
from .ops import errors, requests

SDEStep = ref.SDEStep


def sde_step(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_next, noise_level: float = 0.7,
             dynamics: str = "flow", prev_sample: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, *, noise: Optional[torch.Tensor] = None,
             return_mean: bool = True, validate: Union[bool, str] = True) -> SDEStep:
    """One SDE step of the denoising loop and its log-probability (SPEC §2).

    Args:
        model_output: velocity v, (B, *latent) in float16/bfloat16/float32/float64 (after CFG).
        sample: current latent x at ``sigma``, same shape.
        sigma, sigma_next: floats or 1-D tensors of length B; 0 < sigma <= 1, 0 <= sigma_next < sigma.
        noise_level: eta. dynamics: "flow" (Flow-GRPO), "dance" (DanceGRPO) or "cps".
        prev_sample: the next latent x' to score (training); None draws it (rollout) from ``generator``
            or takes ``noise`` (standard normal, same shape).
        return_mean: False skips prev_sample_mean (returned as None): a latent-sized float32 write the
            fused kernels then do not make (a rollout that keeps x' and log_prob only).
        validate: True (default): tensor sigmas are checked on the device, no host sync: a sample whose sigmas
            are out of range gets a NaN log_prob and :func:`grpo_guard.check_errors` raises, naming the
            argument. "sync": checked at once (a host sync; debugging). False: not checked.

    Returns ``SDEStep(prev_sample, log_prob, prev_sample_mean, std_dev_t)``:
        prev_sample (sample's dtype), log_prob (B,) = mean over latent dims (float32, float64 for float64
        inputs), prev_sample_mean (float32/float64, enough to make the on-policy ratio exactly 1),
        std_dev_t (B,). Differentiable w.r.t. model_output and sample; x' enters log_prob as a constant.
    """
    req = requests.sde_request(model_output, sample, sigma, sigma_next, noise_level=noise_level,
                               dynamics=dynamics, prev_sample=prev_sample, generator=generator, noise=noise,
                               return_mean=return_mean, validate=validate)
    return dispatch.run("sde_step", req, model_output.device)


def policy_loss(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: torch.Tensor, sigma, sigma_next,
                advantages: torch.Tensor, *, old_log_prob: Optional[torch.Tensor] = None,
                old_prev_sample_mean: Optional[torch.Tensor] = None,
                old_model_output: Optional[torch.Tensor] = None, noise_level: float = 0.7,
                dynamics: str = "flow", method: str = "guard", clip_range: float = 2e-6,
                adv_clip_max: float = 5.0, guard_weight: str = "dt", kl_threshold: float = 1e-5,
                validate: Union[bool, str] = True):
    """The clipped policy loss of one trained timestep, fused from the velocity to the scalar (SPEC §4-6).

    ``loss = mean_i w_i * max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps))``, A clamped to +-adv_clip_max,
    w_i = 1/|dt_i| for method "guard" (``guard_weight="beta_dt"``: beta_i/|dt_i|) else 1, and rho by method:

    - "grpo": r = p_theta/p_old (needs old_log_prob, or an old mean/velocity for the exact closed form)
    - "mean_revised": log r + bias, bias = mean_D (mu_theta - mu_old)^2 / (2 s^2)
    - "ratio_norm": RatioNorm, log r_hat = s (log r + bias) = mean_D[z (mu_theta - mu_old)], no reweight
    - "guard": RatioNorm + 1/|dt| reweighting (GRPO-Guard)
    - "dppo": Flow-DPPO (SPEC §9): no clipping; ``loss = mean_i -A_i r_i (1 - drop_i)``, drop_i = (K_i >=
      kl_threshold) and (A_i log r_i > 0), K_i = mean_D (mu_theta - mu_old)^2 / (2 s^2) the exact per-step KL;
      ``adv_clip_max`` still clamps A (the official code does not: pass ``float("inf")``); stats add kl_mean,
      kl_max, masked_fraction and masked_fraction_pos / _neg. Same kernels and launch count as "guard" on the
      Triton and CUDA backends (K and log r come from the same two per-sample sums).

    The last four need ``old_prev_sample_mean`` (as returned by :func:`sde_step` at rollout) or
    ``old_model_output`` (the rollout velocity: exact and, for bf16 models, half the storage).
    Clip decisions compare log-ratios with log(1 +- eps). Gradients flow to ``model_output`` only.

    Returns ``(loss, stats)``: loss 0-dim; stats detached: ratio_mean, ratio_std, clipfrac, approx_kl
    (0-dim), log_ratio (B,) and bias (B,) when an old mean is known.

    validate: True (default): advantages, old_log_prob and tensor sigmas are checked on the device, no host
    sync: if a sample fails, the loss and its gradient are NaN and :func:`grpo_guard.check_errors` raises,
    naming the argument. "sync": checked at once (host syncs; debugging).
    False: not checked. Python-number arguments are always checked on the host.
    """
    req = requests.loss_request(model_output, sample, prev_sample, sigma, sigma_next, advantages,
                                old_log_prob=old_log_prob, old_prev_sample_mean=old_prev_sample_mean,
                                old_model_output=old_model_output, noise_level=noise_level, dynamics=dynamics,
                                method=method, clip_range=clip_range, adv_clip_max=adv_clip_max,
                                guard_weight=guard_weight, validate=validate, kl_threshold=kl_threshold)
    return dispatch.run("policy_loss", req, model_output.device)


def group_advantages(rewards: torch.Tensor, group_ids: Union[torch.Tensor, Sequence], global_std: bool = False,
                     eps: float = 1e-4, *, validate: Union[bool, str] = True) -> torch.Tensor:
    """Group-relative advantages (SPEC §3): ``A_i = (r_i - mean_g r) / (std + eps)``, population std of the
    group (or of the whole batch with ``global_std``).

    rewards: (N,) floating tensor, finite. group_ids: (N,) integer tensor on any device, or a sequence of
    hashables (e.g. the prompts) that defines the groups. Returns (N,) float32 (float64 for float64 rewards).
    No host synchronization: non-finite rewards give NaN advantages (their group's) and are reported by
    :func:`grpo_guard.check_errors` (``validate=True``), or raise at once (``validate="sync"``).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError("rewards must be a 1-D floating tensor, got "
                         f"{type(rewards).__name__}{tuple(getattr(rewards, 'shape', ()))}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    mode = requests.validate_mode(validate)
    if mode == "sync" and not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards has non-finite values at indices {bad}")
    if mode == "device":
        if not errors.passes_on_host({"rewards": rewards}, lambda values: [errors.finite(values["rewards"])]):
            errors.flag(errors.GROUP_ADVANTAGES, [errors.finite(rewards)], rewards.device)
    if not isinstance(group_ids, torch.Tensor):
        index = {}
        ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
        group_ids = ids.pin_memory().to(rewards.device, non_blocking=True) if rewards.is_cuda else ids
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got "
                         f"{tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return ref.group_advantages(rewards, group_ids.to(rewards.device, non_blocking=True), global_std=global_std,
                                eps=eps)


def kl_to_reference(prev_sample_mean: torch.Tensor, ref_prev_sample_mean: torch.Tensor,
                    std_dev_t: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_theta || p_ref) of one SDE step (SPEC §4), from what :func:`sde_step` returned for the
    policy and for the reference model: ``mean_D (mu_theta - mu_ref)^2 / (2 std_dev_t^2)``, shape (B,).
    Differentiable w.r.t. ``prev_sample_mean``; add ``beta_kl * kl.mean()`` to the loss (off in GRPO-Guard)."""
    requests._latent("prev_sample_mean", prev_sample_mean)
    requests._latent("ref_prev_sample_mean", ref_prev_sample_mean, like=prev_sample_mean)
    B = prev_sample_mean.shape[0]
    if not isinstance(std_dev_t, torch.Tensor) or std_dev_t.shape != (B,):
        raise ValueError(f"std_dev_t must be a tensor of shape ({B},) (sde_step's std_dev_t), got "
                         f"{getattr(std_dev_t, 'shape', type(std_dev_t).__name__)}")
    return ref.kl_to_reference(prev_sample_mean, ref_prev_sample_mean, std_dev_t)
