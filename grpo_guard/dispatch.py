"""Backend choice, xformers-style: pick by what the tensors' device supports, say which one ran.

Backends, best first: ``"triton"`` (fused kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
``"cuda"`` (the csrc extension ``grpo_guard._C``; CUDA tensors), ``"torch"`` (the reference; any device).
Choose with the env var ``GRPO_GUARD_BACKEND`` (read at every call) or ``with grpo_guard.backend("triton"):``;
the context manager wins. ``"auto"`` (the default) takes the first backend that supports the device, except
that on CPU it takes ``"torch"`` (the Triton interpreter is a debugging tool, 1000x slower). Asking explicitly
for a backend that cannot run raises :class:`BackendUnavailable` with the reason.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Optional

import torch

BACKENDS = ("triton", "cuda", "torch")
_MODULES = {"triton": "grpo_guard.ops.triton_backend", "cuda": "grpo_guard.ops.cuda_backend",
            "torch": "grpo_guard.ops.torch_backend"}
_state = threading.local()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these tensors; the message says why."""


_LOADED = {}


def _load(name: str):
    """The backend module, or raise BackendUnavailable (import errors become the reason; a failed import is tried
    again at the next call)."""
    module = _LOADED.get(name)
    if module is None:
        try:
            module = _LOADED[name] = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise BackendUnavailable(f"backend {name!r} is not importable: {exc}") from exc
    return module


def unsupported_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else a human-readable reason."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    try:
        module = _load(name)
    except BackendUnavailable as exc:
        return str(exc)
    return module.unsupported_reason(device)


def available_backends(device="cpu"):
    """Names of the backends that can run on ``device``, best first."""
    device = torch.device(device)
    return [n for n in BACKENDS if unsupported_reason(n, device) is None]


def requested() -> str:
    """The backend asked for: context manager, else GRPO_GUARD_BACKEND, else "auto"."""
    name = getattr(_state, "forced", None) or os.environ.get("GRPO_GUARD_BACKEND", "auto") or "auto"
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"GRPO_GUARD_BACKEND / backend() must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Run the ops in this block on backend ``name`` ("triton", "cuda", "torch" or "auto")."""
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def resolve(device: torch.device):
    """-> (name, module) of the backend to run on ``device`` now."""
    name = requested()
    if name != "auto":
        reason = unsupported_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} requested but unavailable on {device}: {reason}")
        return name, _load(name)
    order = BACKENDS if device.type == "cuda" else ("torch",)
    for candidate in order:
        if unsupported_reason(candidate, device) is None:
            return candidate, _load(candidate)
    raise BackendUnavailable(f"no backend supports device {device}")  # torch supports every device


def run(op: str, request, device: torch.device):
    """Call ``op`` ("sde_step" or "policy_loss") of the chosen backend and remember which one ran. Under
    torch.compile, the backend's operator (grpo_guard/ops/library.py): the backend is chosen when the caller is
    traced (:func:`compiled_backend`)."""
    if torch.compiler.is_compiling():
        from .ops import library
        name = compiled_backend(device.type)
        compiled = library.COMPILED[op].get(name)
        if compiled is None:
            raise BackendUnavailable(f"backend {name!r} has no torch.compile path yet; use the triton or torch "
                                     "backend inside compiled code (grpo_guard.backend('triton'))")
        return compiled(request)
    name, module = resolve(device)
    _state.last = name
    return getattr(module, op)(request)


@torch.compiler.assume_constant_result
def compiled_backend(device_type: str) -> str:
    """The backend :func:`resolve` picks for a device of this type, evaluated once when a compiled caller is traced
    (a constant of the graph: changing GRPO_GUARD_BACKEND or grpo_guard.backend() later does not retrace). It runs
    outside the trace, so it also makes the device's error word (errors.py) if it does not exist yet: the traced
    code then finds it, and the guard on it holds at the next call."""
    from .ops import errors
    errors.word(device_type)
    return resolve(torch.device(device_type))[0]


def last_backend() -> Optional[str]:
    """The backend that ran the most recent op in this thread (None before the first)."""
    return getattr(_state, "last", None)
