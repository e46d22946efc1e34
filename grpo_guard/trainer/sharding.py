"""What the trainer needs to run under FSDP2 (accelerate's ``fsdp_version: 2``), where the trained parameters,
their gradients, the optimizer state and the EMA are sharded DTensors. Everything here is the identity on plain
tensors, so the single-process and DDP-style paths run the same code.

Collective functions (``full``, ``sharded_like``, ``optimizer_state``, ``load_optimizer_state``) must be called
on every process, in the same order.
"""
from __future__ import annotations

from typing import Dict

import torch

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch: no FSDP2, nothing is ever a DTensor
    DTensor, distribute_tensor = (), None


def distributed_kind(accelerator) -> str:
    """accelerate's ``distributed_type`` by name ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED", ...)."""
    return getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))


def is_fsdp2(accelerator) -> bool:
    """True when accelerate shards the model with FSDP2 (``distributed_type`` FSDP, ``fsdp_version`` 2)."""
    if distributed_kind(accelerator) != "FSDP":
        return False
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


def check(accelerator, cfg) -> None:
    """Options of accelerate's FSDP2 plugin that clash with the trainer config (before the model is built)."""
    from .config import ConfigError

    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if cfg.run.mixed_precision == "fp16":
        raise ConfigError("run.mixed_precision: fp16 under FSDP2 (its sharded loss scaler is not handled by the "
                          "trainer); use bf16, or fp16 with one process or DDP-style processes")
    if cfg.train.gradient_checkpointing and getattr(plugin, "activation_checkpointing", False):
        raise ConfigError("train.gradient_checkpointing: true with fsdp_activation_checkpointing: true would "
                          "recompute every block twice in the backward; keep one of them")


def is_sharded(t) -> bool:
    return isinstance(t, DTensor) if DTensor else False


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``t`` (``t`` itself when not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (collective for a DTensor)."""
    return t.full_tensor() if is_sharded(t) else t


def sharded_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``ref``: distributed over ref's mesh and placements when ref is a
    DTensor (collective), else moved to ref's device and dtype."""
    value = value.to(device=local(ref).device, dtype=ref.dtype)
    if is_sharded(ref):
        return distribute_tensor(value, ref.device_mesh, ref.placements)
    return value


def reshard(model) -> None:
    """Free the gathered copies FSDP2 keeps after a forward of groups that do not reshard after forward (accelerate
    keeps the root unsharded): after that, ``named_parameters`` are the sharded DTensors again and the next forward
    gathers them anew. Call after no-grad forwards (evaluation) and before touching the sharded parameters
    (EMA swap, checkpoints). No-op without FSDP2."""
    if model is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_precision_gradient_reduction(accelerator) -> None:
    """Under FSDP2 with bf16/fp16 mixed precision, accelerate's policy reduce-scatters gradients in that dtype at
    every backward; the DDP-style path averages float32 gradients once. Make FSDP2 reduce in float32 too (the
    compute dtype stays). Call before ``prepare``."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is not None and getattr(policy, "reduce_dtype", None) not in (None, torch.float32):
        import dataclasses

        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def name_keyed(optim_state: Dict, names) -> Dict:
    """An optimizer state dict keyed by parameter index (``Optimizer.state_dict()``, what a single-process or
    DDP-style run saves) keyed by parameter name instead (what :func:`optimizer_state` gives under FSDP2).
    ``names``: the trained parameters' names in the optimizer's order. Name-keyed input is returned as is."""
    groups = optim_state.get("param_groups", [])
    if not groups or all(isinstance(i, str) for g in groups for i in g["params"]):
        return optim_state
    names = list(names)
    return {"state": {names[i]: v for i, v in optim_state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in groups]}


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def optimizer_state(model, optimizer, sharded: bool) -> Dict:
    """The optimizer's state dict with whole tensors (collective when ``sharded``; then only the main process
    gets the state, the others ``{}``)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: Dict, sharded: bool) -> None:
    """Inverse of :func:`optimizer_state` (collective when ``sharded``: ``state`` is read on the main process
    and broadcast)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
