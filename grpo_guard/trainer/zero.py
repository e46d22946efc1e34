"""What the trainer needs under DeepSpeed ZeRO stage 1 or 2 (an accelerate config with ``distributed_type:
DEEPSPEED``). The engine owns the gradient reduction, the non-finite check, clipping and the AdamW step; the
trainer keeps its own accumulation window over timesteps and micro-batches:

- every backward of an optimizer step runs with ``scale_wrt_gas=False`` (the loss already carries 1 / (timesteps
  x micro-batches)), the accumulation boundary set on the last one, then one ``engine.step()``;
- ZeRO-2 reduces gradients into partitions during each backward (a collective), so every process runs every
  backward, a non-finite loss included; the engine's overflow check then skips the step on all processes;
- each timestep's gradient norm is measured by hooks on the trained parameters, which see each backward's local
  gradient before DeepSpeed takes it (``p.grad`` is empty under ZeRO-2);
- the float32 master weights live in the ZeRO optimizer's partitions: :func:`full_params` gathers them
  (collective) for the EMA and for checkpoints; the optimizer state is saved with DeepSpeed's own checkpoint
  (one file per process), so resuming needs DeepSpeed and the same number of processes.

Stage 3 (parameters partitioned: the rollout and the KL reference would gather them at every forward) and
optimizer offload (needs DeepSpeed's CPU Adam, the trainer builds torch AdamW) are refused; FSDP2 covers sharded
parameters. fp16 is refused like everywhere else (run.mixed_precision). Under bf16 DeepSpeed casts the module to bf16;
gradients are accumulated and averaged in float32 (``data_types.grad_accum_dtype``, ``communication_data_type``,
unless the config sets them), as on the DDP-style path.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterable, Iterator, Sequence

import torch

from . import sharding
from .config import Config, ConfigError, UnsupportedDistributedError

STAGES = (1, 2)
TAG = "deepspeed"  # sub-directory of a checkpoint holding DeepSpeed's files


def requested() -> bool:
    """True when the launcher asks accelerate for DeepSpeed (``accelerate launch`` with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator) -> bool:
    return sharding.distributed_kind(accelerator) == "DEEPSPEED"


def _auto(value) -> bool:
    return value is None or value == "auto"


def configure(accelerator, cfg: Config) -> None:
    """Check accelerate's DeepSpeed config against what the trainer implements and fill its ``auto`` values from
    the trainer config (before ``prepare``). Raises ConfigError naming the key."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise UnsupportedDistributedError(
            f"DeepSpeed zero_optimization.stage {stage} is not supported (supported: 1, 2): "
            + ("stage 3 partitions the parameters, which every rollout forward and the KL reference would gather; "
               "for sharded parameters use FSDP2 (configs/accelerate/fsdp2.yaml)" if stage == 3 else
               "stage 0 is plain data parallelism: use `accelerate launch --multi_gpu` (DDP) instead"))
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        raise UnsupportedDistributedError(
            f"DeepSpeed zero_optimization.offload_optimizer.device {offload!r} is not supported: optimizer offload "
            "needs DeepSpeed's CPU Adam and the trainer builds torch AdamW; set it to none")
    bf16 = cfg.run.mixed_precision == "bf16"
    refused = [  # (refused?, key and why)
        (cfg.run.mixed_precision == "fp16",
         "run.mixed_precision: fp16 (DeepSpeed's fp16 loss scaler skips steps on its own); use bf16"),
        ((ds.get("fp16") or {}).get("enabled") is True,
         "fp16.enabled: true (its loss scaler skips steps on its own); use bf16 (run.mixed_precision: bf16)"),
        ((ds.get("bf16") or {}).get("enabled") in (True, False) and ds["bf16"]["enabled"] != bf16,
         f"bf16.enabled: {ds.get('bf16', {}).get('enabled')} with run.mixed_precision: {cfg.run.mixed_precision} "
         "(set bf16.enabled: auto; the trainer config decides)"),
        ((ds.get("bf16") or {}).get("check_grad_overflow") is False,
         "bf16.check_grad_overflow: false (a step with non-finite gradients would be applied)"),
        (zero.get("compute_grad_norm") is False, "zero_optimization.compute_grad_norm: false (no gradient norm)"),
        (zero.get("load_from_fp32_weights") is False,
         "zero_optimization.load_from_fp32_weights: false (resume would rebuild the float32 masters from bf16)"),
        ("scheduler" in ds, "a scheduler section (the trainer steps its own LR schedule: train.learning_rate, "
                            "train.warmup_steps)"),
        ("optimizer" in ds, "an optimizer section (the trainer builds AdamW from train.learning_rate, adam_*)"),
        (ds.get("managed_gradient_accumulation") is False,
         "managed_gradient_accumulation: false (the trainer sets the accumulation boundary itself)"),
        (not _auto(ds.get("gradient_accumulation_steps")) and int(ds["gradient_accumulation_steps"]) != 1,
         f"gradient_accumulation_steps is {ds.get('gradient_accumulation_steps')}: set it to 1 or auto (the trainer "
         "accumulates over timesteps and micro-batches itself: sample.num_batches, train.updates_per_step)"),
        (not _auto(ds.get("gradient_clipping")) and float(ds["gradient_clipping"]) != cfg.train.max_grad_norm,
         f"gradient_clipping is {ds.get('gradient_clipping')} but train.max_grad_norm is "
         f"{cfg.train.max_grad_norm}: set gradient_clipping: auto"),
        (not _auto(ds.get("train_micro_batch_size_per_gpu"))
         and int(ds["train_micro_batch_size_per_gpu"]) != cfg.sample.batch_size,
         f"train_micro_batch_size_per_gpu is {ds.get('train_micro_batch_size_per_gpu')} but sample.batch_size is "
         f"{cfg.sample.batch_size}: set it to auto"),
    ]
    for bad, why in refused:
        if bad:
            raise ConfigError(f"DeepSpeed config: {why}")
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds["train_micro_batch_size_per_gpu"] = cfg.sample.batch_size
    ds["train_batch_size"] = cfg.sample.batch_size * accelerator.num_processes
    if bf16:  # accumulate over timesteps x micro-batches and average over processes in float32, as DDP-style does
        types = ds.setdefault("data_types", {})
        if _auto(types.get("grad_accum_dtype")):
            types["grad_accum_dtype"] = "fp32"
        if _auto(ds.get("communication_data_type")):
            ds["communication_data_type"] = "fp32"
    plugin.gradient_accumulation_steps = 1
    plugin.gradient_clipping = cfg.train.max_grad_norm


def autocast(accelerator):
    """The autocast context factory of the trainer's forwards: accelerate's, except fp16 on a CPU (accelerate's
    is a no-op there: torch.autocast to float16, without a loss scaler) and under DeepSpeed with bf16,
    where accelerate turns autocast off (DeepSpeed casts the module to bf16) and the float32 latents and text
    embeddings would meet bf16 weights: ``torch.autocast`` to bf16 then, in the rollout and the update alike."""
    if is_deepspeed(accelerator) and accelerator.mixed_precision == "bf16":
        return functools.partial(torch.autocast, device_type=accelerator.device.type, dtype=torch.bfloat16)
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:  # accelerate does no fp16 on a CPU
        return functools.partial(torch.autocast, device_type=accelerator.device.type, dtype=torch.float16)
    return accelerator.autocast


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One backward inside the trainer's accumulation window; ``last`` marks the window's final backward."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> tuple:
    """Reduce (ZeRO-1) / finalize (ZeRO-2), check for non-finite gradients on all processes, clip, step AdamW,
    zero the gradients. Returns (applied, gradient norm before clipping; inf when skipped)."""
    engine.step()
    applied = bool(engine.was_step_applied())
    norm = engine.get_global_grad_norm()
    norm = float("inf") if norm is None or not applied else float(norm)
    return applied, norm


def full_params(params: Iterable[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
    """The float32 master weights of ``params``, each whole on every process, one at a time (collective: consume
    it on every process)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return (safe_get_full_fp32_param(p) for p in params)


class LocalGradientNorm:
    """Hooks on the trained parameters that sum each backward's local gradient (as autograd hands it over, before
    DeepSpeed reduces it) into float32 buffers; :meth:`pop` returns the norm of the sum since the last pop (one
    timestep's gradient on this process) and clears it. One float32 copy of the trained parameters."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.buffers = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self.handles = [p.register_hook(self._adder(b)) for p, b in zip(params, self.buffers)]

    @staticmethod
    def _adder(buffer):
        def add(grad):
            buffer.add_(grad.float())
        return add

    def pop(self) -> torch.Tensor:
        sq = torch.zeros((), dtype=torch.float64, device=self.buffers[0].device)
        for b in self.buffers:
            sq += b.square().sum().double()
            b.zero_()
        return sq.sqrt()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def save(engine, directory: str) -> None:
    """DeepSpeed's checkpoint (trained weights, float32 masters and AdamW state partitions, one file per process)
    under ``directory/deepspeed`` (collective)."""
    engine.save_checkpoint(directory, tag=TAG, save_latest=False, exclude_frozen_parameters=True)
    if engine.global_rank == 0:  # the writer of DeepSpeed's converter scripts (weights.safetensors has the weights)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, script))


def load(engine, directory: str) -> bool:
    """Inverse of :func:`save` (collective). False if DeepSpeed found nothing to load."""
    path, _ = engine.load_checkpoint(directory, tag=TAG, load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    return path is not None
