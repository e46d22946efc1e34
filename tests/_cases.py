"""Input builders shared by the tests and benchmarks (not a test module).

Schedules follow SPEC §1: SD3.5-M as trained by Flow-GRPO = FlowMatchEulerDiscreteScheduler(shift=3), 10 steps.
"""
from __future__ import annotations

import math

import torch

from grpo_guard import reference as ref

# SPEC §7 reference shapes: name -> (latent shape per sample, typical micro-batch)
SHAPES = {
    "sd35_512": ((16, 64, 64), 9),
    "sd35_1024": ((16, 128, 128), 4),
    "flux_1024": ((4096, 64), 4),
    "wan_480p": ((16, 21, 60, 104), 2),
}


def sd35_sigmas(steps: int = 10, shift: float = 3.0, train_timesteps: int = 1000):
    """The sigma schedule diffusers' FlowMatchEulerDiscreteScheduler(shift) gives for ``steps`` steps,
    ending with 0 (the shift is applied to the training grid, then again to the inference linspace)."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = shifted(1.0 / train_timesteps)
    lin = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    return [shifted(float(s)) for s in lin] + [0.0]


def latents(B, latent_shape, dtype=torch.float32, device="cpu", generator=None):
    """(v, x) like a denoising step: x ~ N(0, 1) latents, v ~ N(0, 1) velocities."""
    shape = (B, *latent_shape)
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return v, x


def rollout_case(B, latent_shape, sigma, sigma_next, *, dtype=torch.float32, dynamics="flow", noise_level=0.7,
                 device="cpu", generator=None):
    """A rollout in float64 (the oracle), rounded to ``dtype``: returns dict(v_old, x, x_next, mu_old64)."""
    v, x = latents(B, latent_shape, dtype, device, generator)
    coef = ref.step_coefficients(sigma, sigma_next, noise_level, dynamics)
    mu = ref.transition_mean(v, x, coef, torch.float64)
    z = torch.randn(mu.shape, generator=generator, dtype=torch.float64).to(device)
    x_next = (mu + coef.std.to(device).reshape(-1, 1) * z).reshape(x.shape).to(dtype)
    return {"v_old": v, "x": x, "x_next": x_next}


def perturb_for_log_ratio(v_old, x, x_next, sigma, sigma_next, target, *, dynamics="flow", noise_level=0.7,
                          generator=None):
    """A new velocity v = v_old + dv whose RatioNorm log-ratio mean_D[z*b*dv] is about ``target`` per sample,
    with dv a random direction (not aligned with z) scaled to hit the target. Returns v in v_old's dtype."""
    B = x.shape[0]
    coef = ref.step_coefficients(sigma, sigma_next, noise_level, dynamics)
    mu_old = ref.transition_mean(v_old, x, coef, torch.float64)
    z = (x_next.reshape(B, -1).double() - mu_old) / coef.std.reshape(-1, 1).to(mu_old.device)
    direction = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device)
    direction = direction + 0.05 * z  # a realistic change correlates a little with the sampled noise
    per = (z * direction).mean(dim=1) * coef.b.reshape(-1).to(z.device)
    dv = direction * (torch.as_tensor(target, dtype=torch.float64) / per).reshape(-1, 1)
    return (v_old.double() + dv.reshape(v_old.shape)).to(v_old.dtype)
