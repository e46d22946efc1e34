"""Memory layouts (no triton): latents as the kernels read them in place, (B, D) rows that are each contiguous,
with any stride over the batch dim (``latents[:, k]`` of a (B, T, ...) trajectory tensor); and the packed stats
buffer that policy_loss's Triton kernels and torch.library operators return."""
from __future__ import annotations

import torch

from .. import reference as ref


def flat(t: torch.Tensor) -> torch.Tensor:
    """Contiguous view (copy only if needed) of a tensor the kernels index as flat (B, D) or (B,)."""
    return t if t.is_contiguous() else t.contiguous()


def samples_contiguous(t: torch.Tensor) -> bool:
    """True if every sample t[i] is contiguous (any stride over the batch dim)."""
    if t.is_contiguous():
        return True
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
    return t, (t.stride(0) if t.shape[0] > 1 else t.numel())


def n_stats(B: int, method: str) -> int:
    """Length of policy_loss's packed stats: ratio_mean, ratio_std, clipfrac, approx_kl, log_ratio (B), bias (B)
    (zeros without an old mean), and for "dppo" reference.DPPO_STATS."""
    return 4 + 2 * B + (len(ref.DPPO_STATS) if method == "dppo" else 0)


def stats_dict(stats: torch.Tensor, B: int, has_bias: bool, method: str):
    """The stats dict of reference.policy_loss, as views of the packed (:func:`n_stats`,) buffer."""
    out = {"ratio_mean": stats[0], "ratio_std": stats[1], "clipfrac": stats[2], "approx_kl": stats[3],
           "log_ratio": stats[4:4 + B]}
    if has_bias:
        out["bias"] = stats[4 + B:4 + 2 * B]
    if method == "dppo":
        out.update({k: stats[4 + 2 * B + i] for i, k in enumerate(ref.DPPO_STATS)})
    return out
