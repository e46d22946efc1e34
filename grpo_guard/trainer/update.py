"""Update: for each trained timestep, recompute the velocity exactly as in the rollout (same micro-batch, CFG,
autocast), call :func:`grpo_guard.policy_loss` with the stored rollout velocity, accumulate gradients over
timesteps and micro-batches, clip, and step AdamW.

Gradient accumulation: one optimizer step per ``len(batches) / updates_per_step`` rollout micro-batches; the
loss of each (timestep, micro-batch) is scaled by 1 / (timesteps * micro-batches), so the step's gradient is
that of the mean loss (SPEC §4). Under DDP every backward runs without synchronization and the accumulated
gradients are averaged once (``accelerator.reduce``) before clipping, which also lets each timestep's own
gradient norm (the paper's gradient-balance diagnosis) be measured before the average. Under FSDP2 every backward
reduce-scatters the gradients into shards (as FSDP does), and each timestep's gradient norm is that of the
averaged gradient, summed over the shards. Under DeepSpeed ZeRO-1/2 the engine reduces, clips and steps
(:mod:`.zero`); each timestep's norm is that of this process's gradient, as under DDP.

A non-finite loss or gradient norm on any process skips the optimizer step on all of them. The update makes one
host synchronization per optimizer step (the gradient norm and the skip decision, which also carries the ops'
device-side input checks, :func:`grpo_guard.check_errors`); the loss of each (timestep, micro-batch) is never read
on the host in between.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import torch

import grpo_guard as gg
from grpo_guard.ops import errors

from . import sharding, zero
from .config import Config, UnsupportedDistributedError  # noqa: F401 (re-exported)
from .rollout import RolloutBatch

STAT_KEYS = ("loss", "ratio_mean", "ratio_std", "clipfrac", "approx_kl", "kl", "grad_norm")
# train.method dppo adds, per timestep (weighted means over micro-batches, then over processes; kl_max is each
# micro-batch's largest per-sample K, averaged so)
DPPO_KEYS = ("kl_mean", "kl_max", "masked_fraction", "masked_fraction_pos", "masked_fraction_neg")


def kl_to_reference(v: torch.Tensor, v_ref: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, sigma: float,
                    sigma_next: float, cfg: Config) -> torch.Tensor:
    """KL(p_theta || p_ref) of one step, per sample (SPEC §4, :func:`grpo_guard.kl_to_reference`), from the
    policy's and the reference's transition means. Differentiable w.r.t. ``v``."""
    kw = dict(noise_level=cfg.sample.noise_level, dynamics=cfg.sample.dynamics, prev_sample=x_next)
    ref = gg.sde_step(v_ref, x, sigma, sigma_next, **kw)
    cur = gg.sde_step(v, x, sigma, sigma_next, **kw)
    return gg.kl_to_reference(cur.prev_sample_mean, ref.prev_sample_mean.detach(), cur.std_dev_t)


_WHY = {
    "FSDP": "FSDP1 wraps the transformer in a module that the rollout and the LoRA on/off switch of the KL "
            "reference would have to go through; FSDP2 is supported: set fsdp_version: 2 in the accelerate config",
}


def check_distributed(accelerator) -> None:
    """Refuse accelerate modes other than single process, DDP-style multi-process (MULTI_GPU / MULTI_CPU /
    other MULTI_* devices), FSDP2 and DeepSpeed (whose stage and options :func:`zero.configure` checks), with
    what is supported and what to use instead."""
    kind = sharding.distributed_kind(accelerator)
    if kind == "NO" or kind.startswith("MULTI_") or sharding.is_fsdp2(accelerator) or zero.is_deepspeed(accelerator):
        return
    why = _WHY.get(kind, "the trainer synchronizes gradients itself, as DDP does")
    raise UnsupportedDistributedError(
        f"accelerate distributed type {kind} is not supported: {why}. Supported: one process, DDP-style "
        "multi-process (`accelerate launch --multi_gpu --num_processes N -m grpo_guard.train CONFIG` with a config "
        "without deepspeed_config / fsdp_config, or torchrun), and FSDP2 (an accelerate config with "
        "distributed_type: FSDP and fsdp_config.fsdp_version: 2) and DeepSpeed ZeRO stage 1 or 2; see "
        "configs/README.md, Distributed")


class Updater:
    """Owns the optimizer step. ``model`` is the (accelerate-prepared) transformer, ``params`` its trainable
    parameters; ``reference`` a context manager factory under which ``ref_model`` is the frozen reference
    (LoRA disabled) -- needed only for ``beta_kl > 0``."""

    def __init__(self, cfg: Config, accelerator, adapter, model, params: List[torch.nn.Parameter], optimizer,
                 lr_scheduler, ema=None, reference=None, ref_model=None):
        self.cfg, self.acc, self.adapter, self.model = cfg, accelerator, adapter, model
        self.params, self.optimizer, self.lr_scheduler, self.ema = params, optimizer, lr_scheduler, ema
        self.reference, self.ref_model = reference, ref_model
        check_distributed(accelerator)
        self.multi = accelerator.num_processes > 1
        self.fsdp = sharding.is_fsdp2(accelerator)  # backward reduce-scatters: no manual averaging, no no_sync
        self.ds = zero.is_deepspeed(accelerator)  # the engine reduces, clips and steps
        self.manual_sync = self.multi and not self.fsdp and not self.ds
        self.autocast = zero.autocast(accelerator)
        self.scaler = getattr(accelerator, "scaler", None)  # fp16 on a GPU: accelerate's loss scaler
        self.extra_keys = DPPO_KEYS if cfg.train.method == "dppo" else ()

    BUCKET = 1 << 25  # elements per all-reduce (128 MiB of float32)

    def _sync_grads(self):
        """Average the accumulated gradients over processes: ``accelerator.reduce`` on flat buckets."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in self.params + [None]:
            if p is not None and (size + p.numel() <= self.BUCKET or not bucket):
                bucket.append(p)
                size += p.numel()
                continue
            flat = self.acc.reduce(torch.cat([q.grad.reshape(-1) for q in bucket]), reduction="mean")
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q))
                offset += q.numel()
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)

    def _timestep_norms(self):
        """What measures each trained timestep's own gradient norm (``pop()`` after its backwards), or None."""
        if not self.cfg.train.timestep_grad_norms:
            return None
        if self.ds:
            return zero.LocalGradientNorm(self.params)  # p.grad is empty under ZeRO-2
        return AddedGradientNorm(self.params, self.adapter.device, self.acc if self.fsdp else None)

    def _loss_and_backward(self, b: RolloutBatch, k: int, scale: float, last: bool):
        """Recompute the velocity of micro-batch ``b`` at trained step ``k``, its loss (+ KL), and backpropagate
        ``scale`` x it. Returns the detached (loss, ratio_mean, ratio_std, clipfrac, approx_kl, kl) and a 0-dim
        bool tensor, True if the loss is finite: all on the device, nothing read on the host. A non-finite loss
        is still backpropagated (its step is skipped; under DeepSpeed it backpropagates NaN, so that the engine's
        own check skips the step too)."""
        cfg, t = self.cfg, self.cfg.train
        # x is contiguous like the rollout's latents (a strided bf16 input rounds differently in a Linear); the
        # loss takes x' and the old velocity as slices of the trajectory tensors (the kernels read them in place)
        x, x_next = b.latents[:, k].contiguous(), b.latents[:, k + 1]
        sig, nxt = b.sigmas[k], b.sigmas[k + 1]
        with ((lambda: self.acc.no_sync(self.model)) if self.manual_sync else contextlib.nullcontext)():
            with self.autocast():
                v = self.adapter.velocity(self.model, x, sig, b.cond, cfg.sample.guidance_scale, cfg=t.cfg)
            loss, st = gg.policy_loss(
                v.to(x.dtype), x, x_next, sig, nxt, b.advantages, old_model_output=b.old_velocity[:, k].to(x.dtype),
                noise_level=cfg.sample.noise_level, dynamics=cfg.sample.dynamics, method=t.method,
                clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, guard_weight=t.guard_weight,
                kl_threshold=t.kl_threshold)
            kl = torch.zeros((), device=loss.device)
            if t.beta_kl > 0:
                with torch.no_grad(), self.reference(), self.autocast():
                    v_ref = self.adapter.velocity(self.ref_model, x, sig, b.cond, cfg.sample.guidance_scale, cfg=t.cfg)
                kl = kl_to_reference(v.to(x.dtype), v_ref.to(x.dtype), x, x_next, sig, nxt, cfg).mean()
            total = loss + t.beta_kl * kl
            finite = torch.isfinite(total.detach())
            if self.ds:  # a non-finite loss backpropagates NaN into every gradient, so that the engine's check on the
                # gradients skips the step (a non-finite loss can have finite gradients)
                total = total + torch.where(finite, 0.0, float("nan")) * v.float().sum()
                zero.backward(self.model, total * scale, last)
            else:
                self.acc.backward(total * scale)
        row = [loss, st["ratio_mean"], st["ratio_std"], st["clipfrac"], st["approx_kl"], kl]
        row += [st[key] for key in self.extra_keys]
        return torch.stack([r.detach().double() for r in row]), finite

    def step(self, batches: Sequence[RolloutBatch]) -> Dict:
        """One optimizer step over ``batches`` (all with the same trained steps). Returns its metrics:
        ``timesteps``: one dict per trained timestep (sigma, loss, ratio_mean, ratio_std, clipfrac, approx_kl,
        kl, grad_norm), averaged over micro-batches and processes; ``grad_norm`` (before clipping),
        ``skipped`` (1 if the step was non-finite and not applied), ``lr``."""
        K, n = len(batches[0].steps), len(batches)
        self.overflow = False
        keys = STAT_KEYS + self.extra_keys
        stats = torch.zeros(K, len(keys), dtype=torch.float64, device=self.adapter.device)
        nonfinite = torch.zeros((), device=self.adapter.device)
        norms = self._timestep_norms()
        try:
            for k in range(K):
                for i, b in enumerate(batches):
                    w = 1.0 / n if b.loss_weight is None else b.loss_weight  # the batch's share of the mean loss
                    row, finite = self._loss_and_backward(b, k, w / K, last=(k == K - 1 and i == n - 1))
                    nonfinite += (~finite).to(nonfinite.dtype)  # any: the step will be skipped
                    stats[k, :6] += torch.where(finite, row[:6] * w, 0.0)
                    stats[k, 7:] += torch.where(finite, row[6:] * w, 0.0)
                if norms is not None:  # this timestep's own gradient (unscaled under fp16's loss scaler)
                    stats[k, 6] = norms.pop() / (1.0 if self.scaler is None else self.scaler._get_scale_async())
        finally:
            if norms is not None:
                norms.remove()
        skipped, grad_norm, nonfinite = (self._deepspeed_step if self.ds else self._optimizer_step)(nonfinite)
        return self._metrics(stats, batches, skipped, grad_norm, nonfinite)

    def _optimizer_step(self, nonfinite: torch.Tensor):
        """Average (DDP-style), clip, and step unless some process saw a non-finite loss or gradient norm.
        Returns (skipped, gradient norm before clipping, non-finite losses on all processes)."""
        t = self.cfg.train
        if self.manual_sync:
            self._sync_grads()
        if self.fsdp:  # torch's clip handles DTensor gradients (accelerate 1.15's FSDP branch compares parameter
            # lists with ==, which raises for equal-length lists of tensors: full fine-tuning, or a second model)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        else:
            grad_norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm)
        grad_norm = sharding.full(grad_norm).to(self.adapter.device, torch.float32)
        flags = torch.stack([nonfinite.float(), (~torch.isfinite(grad_norm)).float(), self._input_errors()])
        flags = self.acc.reduce(flags, reduction="sum") if self.multi else flags
        flags, grad_norm = flags.tolist(), float(grad_norm)  # the step's one host synchronization
        self._raise_input_errors(flags[2])
        # fp16's loss scaler (accelerate, GPU) skips steps with non-finite gradients itself and lowers its scale:
        # those are overflows, not failures; a non-finite loss is skipped here (the scaler still updates)
        skipped = flags[0] > 0 or (flags[1] > 0 and self.scaler is None)
        if not skipped:
            self.optimizer.step()  # under the scaler: scaler.step (skips on overflow) + scaler.update
            skipped = self.overflow = bool(self.scaler is not None and self.optimizer.step_was_skipped)
        elif self.scaler is not None:
            self.scaler.update()  # clip_grad_norm_ unscaled the gradients: close the scaler's step
        if not skipped:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.params, self.lr_scheduler.last_epoch - 1)
        self.optimizer.zero_grad(set_to_none=True)
        return skipped, grad_norm, int(flags[0])

    def _input_errors(self) -> torch.Tensor:
        """1.0 if an op's device-side input check failed on this process since the last step (errors.py), else 0.0,
        as a device float (joins the step's flags, so every process learns it in the same collective)."""
        return (errors.word(self.adapter.device)[0] != 0).float()

    def _raise_input_errors(self, processes: float) -> None:
        """After the flags' reduction: raise on every process if some process saw invalid op inputs (the one that
        did names them)."""
        if processes > 0:
            gg.check_errors(self.adapter.device)  # raises here if this process saw them
            raise gg.InvalidInputError(f"invalid per-sample inputs were given to grpo_guard ops on {int(processes)} "
                                       "other process(es); see their error")

    def _deepspeed_step(self, nonfinite: torch.Tensor):
        """The engine's step (it skips on non-finite gradients, on every process); then the LR schedule and the
        EMA (of the float32 master weights) when it was applied. Same return as :meth:`_optimizer_step`."""
        applied, grad_norm = zero.step(self.model)
        flags = torch.stack([nonfinite.float(), self._input_errors()])
        flags = (self.acc.reduce(flags, reduction="sum") if self.multi else flags).tolist()
        nonfinite = flags[0]
        self._raise_input_errors(flags[1])
        if applied and nonfinite > 0:
            raise RuntimeError("DeepSpeed applied an optimizer step whose loss was non-finite on some process (its "
                               "gradients were finite); the weights can no longer be trusted")
        if applied:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(zero.full_params(self.params), self.lr_scheduler.last_epoch - 1)
        return not applied, grad_norm, int(nonfinite)

    def _metrics(self, stats, batches, skipped: bool, grad_norm: float, nonfinite: int) -> Dict:
        t = self.cfg.train
        K = len(batches[0].steps)
        stats = self.acc.reduce(stats, reduction="mean") if self.multi else stats
        # per trained timestep; with SDE windows that differ between micro-batches, per window position ("w<k>",
        # sigma and dt averaged over the micro-batches)
        same = all(b.steps == batches[0].steps for b in batches)
        per_t = []
        for k in range(K):
            sig = sum(b.sigmas[k] for b in batches) / len(batches)
            dt = sum(b.sigmas[k + 1] - b.sigmas[k] for b in batches) / len(batches)
            per_t.append(dict(index=batches[0].steps[k] if same else f"w{k}", sigma=sig, dt=dt,
                              **{key: float(stats[k, i]) for i, key in enumerate(STAT_KEYS + self.extra_keys)}))
        if not t.timestep_grad_norms:
            for d in per_t:
                d.pop("grad_norm")
        return {"timesteps": per_t, "grad_norm": grad_norm, "skipped": int(skipped), "overflow": int(self.overflow),
                "nonfinite_losses": nonfinite, "lr": float(self.lr_scheduler.get_last_lr()[0])}


class AddedGradientNorm:
    """Norm of the gradient added to the trained parameters' ``.grad`` since the last :meth:`pop` (this process's
    shards; their squares summed over processes when ``accelerator`` is given, FSDP2), as a float64 scalar on
    ``device``. One float32 gradient copy."""

    def __init__(self, params: Sequence[torch.nn.Parameter], device, accelerator=None):
        self.params, self.device, self.acc = params, device, accelerator
        self.prev = [torch.zeros_like(sharding.local(p), dtype=torch.float32) for p in params]

    def pop(self) -> torch.Tensor:
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, old in zip(self.params, self.prev):
            if p.grad is not None:
                g = sharding.local(p.grad)
                sq += (g.float() - old).square().sum().double()
                old.copy_(g)
        if self.acc is not None:
            sq = self.acc.reduce(sq, reduction="sum")
        return sq.sqrt()

    def remove(self) -> None:
        self.prev = []


class EMA:
    """Exponential moving average of the trained parameters (float32 copies), flow_grpo's schedule: after
    optimizer step n (0-based) with (n + 1) % interval == 0, ema += (1 - d_n) (p - ema) with
    d_n = min((1 + n) / (10 + n), decay) (a short memory early on). flow_grpo calls it once per micro-batch of
    such a step (gradient-accumulation times in a row); here once per optimizer step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, interval: int = 1):
        self.decay, self.interval = decay, interval
        self.shadow = [p.detach().float().clone() for p in params]

    def decay_at(self, n: int) -> float:
        return min((1 + n) / (10 + n), self.decay)

    @torch.no_grad()
    def update(self, params, n: int) -> bool:
        """After optimizer step ``n``; True if the EMA moved."""
        if (n + 1) % self.interval:
            return False
        d = self.decay_at(n)
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().float(), 1.0 - d)
        return True

    @contextlib.contextmanager
    def applied(self, params):
        """Temporarily load the EMA weights into ``params``."""
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, params):
                    p.copy_(b)
