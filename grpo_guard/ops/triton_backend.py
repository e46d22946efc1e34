"""The ``triton`` backend: fused kernels (kernels/, shipped as grpo_guard.kernels) with autograd.

Same contract as the torch backend (the reference): outputs, dtypes, shapes, stats keys and gradients.
Runs on CUDA tensors (compiled) and on CPU tensors under the Triton interpreter, which Triton selects when
the kernels are decorated, i.e. when grpo_guard's Triton modules are first imported: TRITON_INTERPRET=1
must be in the environment before that.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    from . import triton_launch
    from .triton_policy_loss import policy_loss as _policy_loss
    from .triton_sde_step import sde_step as _sde_step
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: the backend reports why instead of failing import
    triton_launch = None
    _IMPORT_ERROR = exc

from . import requests


def unsupported_reason(device) -> Optional[str]:
    """None if the Triton kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    device = torch.device(device)
    interpreted = triton_launch.interpreted()
    if device.type == "cuda":
        if interpreted:
            return None  # the interpreter copies device tensors to the host and back: slow but correct
        if not torch.cuda.is_available():
            return "torch.cuda is not available"
        return None
    if device.type == "cpu":
        if interpreted:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after grpo_guard's Triton kernels were imported (they are "
                    "compiled for a GPU); set it before importing grpo_guard to run them on CPU")
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing "
                "grpo_guard")
    return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), not {device.type}"


def sde_step(req: requests.SDERequest):
    """reference.sde_step's contract: 2 launches forward, 1 backward."""
    return _sde_step(req)


def policy_loss(req: requests.LossRequest):
    """reference.policy_loss's contract (every method, dppo included): 1 launch forward (split kernels: 2), 1 backward."""
    return _policy_loss(req)
