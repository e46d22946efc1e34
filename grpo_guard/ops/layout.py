"""Memory layouts the kernels read in place (no torch, no triton): latents as (B, D) rows that are each
contiguous, with any stride over the batch dim (``latents[:, k]`` of a (B, T, ...) trajectory tensor)."""
from __future__ import annotations

import torch


def flat(t: torch.Tensor) -> torch.Tensor:
    """Contiguous view (copy only if needed) of a tensor the kernels index as flat (B, D) or (B,)."""
    return t if t.is_contiguous() else t.contiguous()


def samples_contiguous(t: torch.Tensor) -> bool:
    """True if every sample t[i] is contiguous (any stride over the batch dim)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def batch_strided(t: torch.Tensor):
    """(t, its stride over the batch dim) for a latent whose samples are contiguous, without a copy; any other
    layout is copied to a contiguous tensor first."""
    if not samples_contiguous(t):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t[0].numel())
