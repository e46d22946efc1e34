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


def is_fsdp2(accelerator) -> bool:
    """True when accelerate shards the model with FSDP2 (``distributed_type`` FSDP, ``fsdp_version`` 2)."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind != "FSDP":
        return False
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


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
