"""Drop-in for Flow-GRPO's ``sde_step_with_logprob`` (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``).

Existing Flow-GRPO trainers switch with one import::

    # from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    from grpo_guard.compat.flow_grpo import sde_step_with_logprob

Every step goes through :func:`grpo_guard.sde_step`, so it runs on whichever backend (triton / cuda / torch)
dispatch picks; no formula lives in this file (SPEC §2 is implemented once, in :mod:`grpo_guard.reference`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .. import api
from .. import reference as ref

#: Flow-GRPO's ``sde_type`` -> our ``dynamics`` (SPEC §2)
SDE_TYPES = {"sde": "flow", "cps": "cps"}

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def _step_indices(scheduler, timestep, batch: int) -> List[int]:
    """scheduler.index_for_timestep(t) for each t of ``timestep`` (a (B,) tensor/sequence, or one value for all)."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 0:
        timestep = timestep.reshape(1)
    elif not isinstance(timestep, (torch.Tensor, list, tuple)):
        timestep = [timestep]
    if len(timestep) not in (1, batch):
        raise ValueError(f"timestep must hold 1 or {batch} (batch size) values, got {len(timestep)}")
    indices = [int(scheduler.index_for_timestep(t)) for t in timestep]
    return indices * batch if len(indices) == 1 and batch > 1 else indices


def _randn_like_diffusers(shape, generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn the way ``diffusers.utils.torch_utils.randn_tensor`` draws it, so that the same
    generator (or list of per-sample generators) gives the same stream as Flow-GRPO: a CPU generator for a
    non-CPU tensor draws on the CPU and moves the result; a list of B generators draws sample by sample."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(gens, list) and len(gens) == 1:
        gens = gens[0]
    first = gens[0] if isinstance(gens, list) else gens
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a generator on {first.device}")
        draw_device = torch.device("cpu")
    if isinstance(gens, list):
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        z = torch.cat([torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in gens], dim=0)
    else:
        z = torch.randn(shape, generator=gens, device=draw_device, dtype=dtype)
    return z.to(device)


def sde_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                          noise_level: float = 0.7, prev_sample: Optional[torch.Tensor] = None,
                          generator: Generator = None, sde_type: Optional[str] = "sde",
                          return_sqrt_dt: bool = False):
    """Flow-GRPO's ``sde_step_with_logprob``, computed by :func:`grpo_guard.sde_step`.

    Same parameters, in Flow-GRPO's order, and the same return tuple
    ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)`` (plus ``sqrt(-dt)`` with ``return_sqrt_dt``).

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (anything with ``sigmas`` and
            ``index_for_timestep``) after ``set_timesteps``. For each ``t`` in ``timestep`` the step index is
            ``scheduler.index_for_timestep(t)``; sigma = ``sigmas[i]``, sigma' = ``sigmas[i + 1]``.
        model_output: velocity v (after CFG), (B, ...). sample: the latent x at sigma, same shape.
        timestep: (B,) scheduler timesteps (one per sample); a single value is also accepted and used for all.
        noise_level: eta. prev_sample: x' to score (training); None samples it (rollout).
        generator: a ``torch.Generator`` or a list of B of them; noise is drawn exactly as Flow-GRPO draws it
            (diffusers' ``randn_tensor`` semantics, float32, shape of ``model_output``), so the same seed gives
            the same x'.
        sde_type: "sde" (our ``dynamics="flow"``) or "cps" (``dynamics="cps"``).
        return_sqrt_dt: also return ``sqrt(-dt)`` shaped (B, 1, ..., 1).

    Returns:
        prev_sample, log_prob (B,), prev_sample_mean, std_dev_t shaped (B, 1, ..., 1) like Flow-GRPO's.

    Differences from the published function (all deliberate):

    - Dtypes. Flow-GRPO casts every input to float32 first. Here the arithmetic is float32 for
      float16/bfloat16/float32 inputs and float64 for float64 inputs; ``log_prob``, ``prev_sample_mean`` and
      ``std_dev_t`` come back in that compute dtype. ``prev_sample`` keeps ``sample``'s dtype (Flow-GRPO returns
      float32): a sampled x' is rounded to the storage dtype and ``log_prob`` is that of the rounded x', so
      rescoring it later gives the same value; a given ``prev_sample`` is returned as given (not ``.float()``-ed).
      Flow-GRPO's callers pass ``.float()`` tensors, for which both return float32.
    - Coefficients (std_dev_t, dt, the mean's coefficients) are derived in float64 from the scheduler's float32
      sigmas and rounded once, instead of evaluated in float32: results agree with Flow-GRPO to float32 rounding.
    - The sigma == 1 guard uses this sample's sigma' (``sigmas[i + 1]``); Flow-GRPO uses ``sigmas[1]``. They
      coincide whenever sigma == 1 only at step 0, which is every diffusers flow-matching schedule.
    - Inputs are validated (``grpo_guard.sde_step``): sigma in (0, 1], sigma' < sigma, matching shapes. An
      unknown ``sde_type`` raises ``ValueError`` (Flow-GRPO fails with an ``UnboundLocalError``).
    - ``timestep`` may be a single value for the whole batch (Flow-GRPO needs an iterable of B values).
    - Noise for float64 inputs is drawn in float32 (as Flow-GRPO draws it, to keep the random stream) and
      widened.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {tuple(SDE_TYPES)}, got {sde_type!r}")
    if isinstance(noise_level, torch.Tensor) and noise_level.dim() > 0:
        raise TypeError("noise_level (the 5th positional argument, as in Flow-GRPO) got a tensor of shape "
                        f"{tuple(noise_level.shape)}; pass prev_sample=... by keyword")
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError("model_output and sample must be torch.Tensors")
    if model_output.dim() < 2:
        raise ValueError(f"model_output must be (B, ...) with latent dims, got shape {tuple(model_output.shape)}")
    B = model_output.shape[0]
    step = _step_indices(scheduler, timestep, B)
    sigmas = scheduler.sigmas
    if max(step) + 1 >= len(sigmas):
        raise ValueError(f"timestep maps to the last sigma (index {max(step)}); there is no next step")
    device = model_output.device
    sigma = sigmas[step].detach().to(device=device, dtype=torch.float64)
    sigma_next = sigmas[[i + 1 for i in step]].detach().to(device=device, dtype=torch.float64)

    noise = None
    if prev_sample is None:
        noise = _randn_like_diffusers(tuple(model_output.shape), generator, device, torch.float32)
        if ref.compute_dtype(model_output, sample) == torch.float64:
            noise = noise.to(torch.float64)
    out = api.sde_step(model_output, sample, sigma, sigma_next, noise_level=float(noise_level),
                       dynamics=SDE_TYPES[sde_type], prev_sample=prev_sample, noise=noise)
    view = (B,) + (1,) * (model_output.dim() - 1)
    std_dev_t = out.std_dev_t.reshape(view)
    if return_sqrt_dt:
        sqrt_dt = torch.sqrt(sigma - sigma_next).to(out.log_prob.dtype).reshape(view)
        return out.prev_sample, out.log_prob, out.prev_sample_mean, std_dev_t, sqrt_dt
    return out.prev_sample, out.log_prob, out.prev_sample_mean, std_dev_t
