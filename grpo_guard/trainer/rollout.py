"""Rollout: sample images with the pipeline's components and our ``sde_step``, storing what the update needs.

Which prompts each process samples (:func:`plan_step`): every step draws ``images_per_step / group_size`` prompts,
repeats each ``group_size`` times, shuffles the whole list with a generator seeded by (seed, step) -- the same on
every process -- and gives process r the r-th contiguous slice, cut into micro-batches. Groups therefore span
processes, and a single process with the same total batch sees the same micro-batches.

Noise is drawn per sample from a generator seeded by (seed, step, sample id) (the initial noise by group id
with ``same_noise_per_group``), so a trajectory does not depend on how samples are split over processes.

Stored per trained step j and sample (D = latent elements; compute dtype = the forwards' (bf16 under bf16
autocast or with bf16 weights), FlowAdapter.velocity_dtype):

- ``latents[:, k]``        x_j                          D x latent dtype (model.latent_dtype or model.dtype)
- ``old_velocity[:, k]``   v_old_j (after CFG)          D x compute dtype  (``policy_loss(old_model_output=)``)

plus x_{last+1} once per trajectory and the prompt embeddings once per sample. For SD3.5-M at 512 px in bf16
(D = 65,536) that is 256 KiB per trained step per sample (a float32 velocity, as accelerate's upcast output would
be, 384 KiB).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

import grpo_guard as gg

from ..models import Cond, FlowAdapter
from ..models.base import DTYPES
from .config import Config, trained_steps

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for seed mixing


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic, order-sensitive)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + _MIX) & 0x7FFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


@dataclass
class PlannedSample:
    prompt_index: int
    group_id: int   # unique within a step: index of the prompt draw
    sample_id: int  # unique within a step: position in the shuffled global list


def plan_step(step: int, num_prompts: int, cfg: Config, world_size: int, rank: int) -> List[List[PlannedSample]]:
    """This process's micro-batches for training step ``step`` (see the module doc)."""
    s = cfg.sample
    total = s.batch_size * s.num_batches * world_size
    n_groups = total // s.group_size
    gen = torch.Generator().manual_seed(mix_seed(cfg.run.seed, step, 1))
    # walk through the prompts in a per-epoch random order, so every prompt is used before any repeats
    per_epoch = max(1, num_prompts)
    first = step * n_groups
    draws = []
    for k in range(first, first + n_groups):
        epoch, pos = divmod(k, per_epoch)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(mix_seed(cfg.run.seed, epoch, 2)))
        draws.append(int(order[pos]))
    flat = [(draws[g], g) for g in range(n_groups) for _ in range(s.group_size)]
    perm = torch.randperm(total, generator=gen).tolist()
    samples = [PlannedSample(flat[p][0], flat[p][1], i) for i, p in enumerate(perm)]
    mine = samples[rank * (total // world_size):(rank + 1) * (total // world_size)]
    return [mine[i:i + s.batch_size] for i in range(0, len(mine), s.batch_size)]


def window_start(step: int, cfg: Config, first_sample_id: int = 0) -> Optional[int]:
    """The SDE window's first step, or None without a window. Drawn uniformly in [lo, hi - k] (both ends
    included: the window [start, start + k) lies inside ``sample.sde_window_range`` [lo, hi), as flow_grpo draws
    it). ``sde_window_per: micro_batch`` (flow_grpo): one window per rollout micro-batch, keyed by its first
    sample id, so micro-batches and processes differ and a single process with the same micro-batches draws the
    same windows; ``step``: one window per step, shared by every process and micro-batch."""
    s = cfg.sample
    if s.sde_window_size <= 0:
        return None
    lo, hi = s.sde_window_range
    key = (cfg.run.seed, step, 3) if s.sde_window_per == "step" else (cfg.run.seed, step, 7, first_sample_id)
    gen = torch.Generator().manual_seed(mix_seed(*key))
    return int(torch.randint(lo, hi - s.sde_window_size + 1, (1,), generator=gen))


@dataclass
class RolloutBatch:
    """One micro-batch of trajectories: what the update needs (see the module doc), plus bookkeeping."""

    prompts: List[str]
    metadata: List[dict]
    sample_ids: torch.Tensor      # (B,) int64, position in the step's global sample list
    group_ids: torch.Tensor       # (B,) int64
    cond: Cond
    steps: List[int]              # trained step indices j (consecutive)
    sigmas: List[float]           # sigma_j for each trained j, then sigma_{last+1}
    latents: torch.Tensor         # (B, K+1, *latent)
    old_velocity: torch.Tensor    # (B, K, *latent)
    rewards: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) float32
    proxy_reward: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    loss_weight: Optional[float] = None  # this micro-batch's share of its optimizer step's loss (set by the loop)

    def __len__(self) -> int:
        return len(self.prompts)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latents, self.old_velocity))

    def select(self, keep: Sequence[int]) -> "RolloutBatch":
        """The samples at positions ``keep`` (a new batch; trajectories and embeddings indexed, not shared).
        Expanded tensors (stride 0 over the batch, e.g. SD3's negative prompt) stay expanded views."""
        idx = torch.tensor(list(keep), dtype=torch.long)

        def take(t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.dim() and t.stride(0) == 0:
                return t[:1].expand(len(idx), *t.shape[1:])
            return t[idx.to(t.device)]
        cond = type(self.cond)({k: (v if k in self.cond.shared else take(v)) for k, v in self.cond.items()})
        return RolloutBatch(
            prompts=[self.prompts[i] for i in keep], metadata=[self.metadata[i] for i in keep],
            sample_ids=take(self.sample_ids), group_ids=take(self.group_ids), cond=cond, steps=list(self.steps),
            sigmas=list(self.sigmas), latents=take(self.latents), old_velocity=take(self.old_velocity),
            rewards={k: take(v) for k, v in self.rewards.items()}, proxy_reward=take(self.proxy_reward),
            advantages=take(self.advantages), loss_weight=self.loss_weight)


def _noise(gens: Sequence[torch.Generator], shape, device, dtype) -> torch.Tensor:
    """Standard normal noise, one CPU generator per sample (reproducible on any device). To a GPU through pinned
    memory, asynchronously: a pageable host-to-device copy would wait for the device's queue."""
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    if torch.device(device).type == "cuda":
        z = z.pin_memory().to(device, non_blocking=True)
    return z.to(device=device, dtype=dtype)


@torch.no_grad()
def sample_batch(adapter: FlowAdapter, model: torch.nn.Module, prompts: Sequence[str], cfg: Config, step: int,
                 sample_ids: Sequence[int], group_ids: Sequence[int], metadata: Optional[List[dict]] = None,
                 autocast=None):
    """Roll out one micro-batch. Returns ``(RolloutBatch, final_latents)``.

    SDE steps (all N, or the SDE window) go through :func:`grpo_guard.sde_step`; other steps are deterministic
    Euler (ODE) steps. ``model`` is the (unwrapped) transformer with its current weights; ``autocast`` is a
    context factory (e.g. ``accelerator.autocast``) used identically by the update.
    """
    s = cfg.sample
    device = adapter.device
    dtype = latent_dtype(cfg)
    shape = adapter.latent_shape()
    sigmas = adapter.sigmas(s.num_steps)
    start = window_start(step, cfg, int(sample_ids[0]))
    train_idx = trained_steps(s, start)
    sde_idx = set(train_idx) if s.sde_window_size > 0 else set(range(s.num_steps))
    cond = adapter.encode_prompts(prompts, s.negative_prompt)
    init_keys = group_ids if s.same_noise_per_group else sample_ids
    init_gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, step, 4, k)) for k in init_keys]
    step_gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, step, 5, k)) for k in sample_ids]
    x = _noise(init_gens, shape, device, dtype)
    lat, vel = [], []
    ctx = autocast or _null
    for i in range(s.num_steps):
        sig, nxt = sigmas[i], sigmas[i + 1]
        with ctx():
            v = adapter.velocity(model, x, sig, cond, s.guidance_scale, cfg=True)
        z = _noise(step_gens, shape, device, torch.float32)  # drawn at every step: one stream per sample
        if i in sde_idx:
            out = gg.sde_step(v.to(x.dtype), x, sig, nxt, noise_level=s.noise_level, dynamics=s.dynamics, noise=z)
            x_next = out.prev_sample
        else:
            x_next = euler_step(x, v, sig, nxt)
        if i in train_idx:
            lat.append(x)
            vel.append(v)
        x = x_next
        if i == train_idx[-1]:
            lat.append(x)
    batch = RolloutBatch(
        prompts=list(prompts), metadata=list(metadata or [{} for _ in prompts]),
        sample_ids=torch.tensor(list(sample_ids), dtype=torch.long),
        group_ids=torch.tensor(list(group_ids), dtype=torch.long), cond=cond, steps=train_idx,
        sigmas=[sigmas[j] for j in train_idx] + [sigmas[train_idx[-1] + 1]],
        latents=torch.stack(lat, 1), old_velocity=torch.stack(vel, 1))
    return batch, x


@torch.no_grad()
def generate(adapter: FlowAdapter, model: torch.nn.Module, prompts: Sequence[str], cfg: Config, seeds: Sequence[int],
             num_steps: Optional[int] = None, autocast=None) -> torch.Tensor:
    """Deterministic (ODE, Euler) sampling for evaluation: final latents of ``prompts``, one seed each."""
    s = cfg.sample
    n = num_steps or s.num_steps
    sigmas = adapter.sigmas(n)
    cond = adapter.encode_prompts(prompts, s.negative_prompt)
    gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, k, 6)) for k in seeds]
    x = _noise(gens, adapter.latent_shape(), adapter.device, latent_dtype(cfg))
    ctx = autocast or _null
    for i in range(n):
        with ctx():
            v = adapter.velocity(model, x, sigmas[i], cond, s.guidance_scale, cfg=True)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def latent_dtype(cfg: Config) -> torch.dtype:
    """The rollout's latents: ``model.latent_dtype`` (flow_grpo: float32), else the model dtype (as diffusers)."""
    return DTYPES[cfg.model.latent_dtype or cfg.model.dtype]


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The deterministic (ODE) flow step x' = x + (sigma' - sigma) v, in float32, stored in x's dtype."""
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
