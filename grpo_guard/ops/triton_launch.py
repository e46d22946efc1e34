"""Launch geometry and argument packing shared by the Triton wrappers (no math here).

The chunking depends on D (and on interpreter vs compiled) only, never on B: a sample's log-prob is summed
in the same order whatever batch it is in, which is what makes ``log p_theta - old_log_prob`` exactly 0
on-policy (sde_step's reduce and policy_loss's reduce use the same geometry and helpers).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from grpo_guard.kernels import sde_step as _k

from .layout import batch_strided, flat, samples_contiguous  # noqa: F401 (re-exported)

DYNAMICS_CODE = {"flow": 0, "dance": 1, "cps": 2}
MAX_CHUNKS = 1024          # partials per sample: the finish kernels tree-sum at most this many
COMPILED_BLOCK = 1024      # elements per loop iteration of a compiled program (4 warps x 8 per thread)
COMPILED_WARPS = 4         # warps per program of the latent-sized kernels
MIN_PROGRAMS = 64          # aim: at least this many programs per sample ...
MAX_ITERS = 4              # ... each at most MAX_ITERS * COMPILED_BLOCK elements (benchmarks/tune_triton.py)
INTERPRETED_BLOCK = 1 << 16  # the interpreter pays per program and iteration, not per element
LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # no FMA contraction: mu rounds identically in every kernel

# The single-launch forward (fused finish, ``*_fwd_kernel`` / ``*_bwd_kernel``), the default since the GPU test
# suite passed with it on an H200 (2026-11-30); GRPO_GUARD_TRITON_FUSED=0 (or FUSED = False) selects the split
# reduce + finish kernels. Its geometry knobs (benchmarks/tune_triton.py --fused, H200 sweep in RESULTS.md):
FUSED = os.environ.get("GRPO_GUARD_TRITON_FUSED", "1").strip() != "0"
FUSED_BLOCK_MIN = 1024       # elements per program and iteration, at least ...
FUSED_BLOCK_MAX = 2048       # ... and at most
FUSED_MIN_PROGRAMS = 64      # programs per sample to aim for, within those bounds
FUSED_MAX_CHUNKS = 2048      # partials per sample: beyond, a program loops over ITERS (constexpr) blocks
FUSED_ELEMS_PER_THREAD = 16  # num_warps = BLOCK / (32 * this), within [1, 16]
FINISH_ROWS_MAX = 1024       # rows per tile of the batch finish

# Opt-in, not yet run on a GPU: GRPO_GUARD_TRITON_LEAN=1 (or LEAN = True) selects the single-launch kernels' lean
# variant, from a reading of their sm_90 SASS (triton 3.6 and 3.9, 2026-12-01) at wan_480p: the forwards held 76-90
# registers per thread (5-6 blocks per SM, 31-38 % occupancy) because their float64 step coefficients were computed
# while the first tile's loads were in flight. Lean: the coefficients before the loads and the forwards capped at
# LEAN_MAXNREG registers for bf16/fp16 latents (no spills: 8 blocks per SM), and bf16 stores by the hardware's
# round-to-nearest-even conversion instead of the hand-rolled rounding (3-5 fewer instructions per element; the
# interpreter, which truncates, keeps the hand-rolled one), and policy_loss's batch finish reads the row buffer once
# when the batch fits one tile of rows (kernels/policy_loss.py ONE_TILE). Same values by construction, except for a
# sample whose tensor sigmas fail the device-side checks: its step coefficients are NaN, so all its outputs are NaN as
# on the torch backend (the default variant makes its log p, loss and gradient NaN, not its x' or mean). It becomes
# the default only after the GPU test suite passes with it and gpu_check.sh's ab_lean step finds it faster.
LEAN = os.environ.get("GRPO_GUARD_TRITON_LEAN", "0").strip() == "1"
LEAN_MAXNREG = 64


def lean_caps_registers(dtypes) -> bool:
    """Whether the lean forwards reading latents of these dtypes get the register cap: 16-bit latents only
    (float32/64 latents need more registers per element: capped, they spill)."""
    return all(d.itemsize == 2 for d in dtypes)


def forward_options(*latents: torch.Tensor) -> dict:
    """Launch options of a single-launch forward kernel reading ``latents``: LAUNCH_OPTIONS; with LEAN, the
    register cap where :func:`lean_caps_registers`."""
    if LEAN and lean_caps_registers(t.dtype for t in latents):
        return dict(LAUNCH_OPTIONS, maxnreg=LEAN_MAXNREG)
    return LAUNCH_OPTIONS


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (decided at their import)."""
    return not isinstance(_k.sde_step_reduce_kernel, triton.runtime.jit.JITFunction)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv without its constexpr wrapper, which costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= n, for n >= 1 (as triton.next_power_of_2, in plain Python)."""
    if n < 1:
        raise ValueError(f"next_power_of_2 needs n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


class Geometry(NamedTuple):
    block: int       # BLOCK (power of 2)
    log_block: int
    iters: int       # loop iterations per program
    chunks: int      # C: programs per sample
    cp: int          # next power of 2 >= C
    log_cp: int
    rows: int        # RB: rows per tile of the finish kernels
    num_warps: int


def geometry(B: int, D: int) -> Geometry:
    """Grid of the latent-sized kernels: B*C programs, each BLOCK*ITERS elements of one sample.
    Depends on D only (B only sets the finish kernels' tile height, which does not change any sum)."""
    if interpreted():
        block = max(16, min(next_power_of_2(D), INTERPRETED_BLOCK))
        iters = 1
    else:
        block = COMPILED_BLOCK
        # enough programs in flight to cover memory latency, each a few BLOCKs long
        iters = min(MAX_ITERS, max(1, D // (block * MIN_PROGRAMS)))
    iters = max(iters, cdiv(D, block * MAX_CHUNKS))
    chunks = cdiv(D, block * iters)
    cp = next_power_of_2(chunks)
    # finish tiles of rows x cp partials: at most one row per thread (the per-row float64 math is long)
    rows = max(1, min(next_power_of_2(B), max(4, 512 // cp)))
    return Geometry(block, block.bit_length() - 1, iters, chunks, cp, cp.bit_length() - 1, rows,
                    4 if interpreted() else COMPILED_WARPS)


def sigma_args(sigma, sigma_next, dummy: torch.Tensor):
    """(sig_ptr, nxt_ptr, sigma, sigma_next, PER_SAMPLE): float64 (B,) tensors are read in-kernel; Python
    floats go as float64 scalars (the kernels annotate them tl.float64, so no float32 rounding)."""
    if isinstance(sigma, torch.Tensor):
        return sigma, sigma_next, 0.0, 0.0, True
    return dummy, dummy, float(sigma), float(sigma_next), False


class FusedGeometry(NamedTuple):
    block: int       # BLOCK (power of 2): elements per program and iteration
    log_block: int
    iters: int       # ITERS (constexpr, a power of 2): blocks per program
    chunks: int      # C: programs per sample
    cp: int          # next power of 2 >= C
    log_cp: int
    num_warps: int


def fused_geometry(D: int) -> FusedGeometry:
    """Grid of the single-launch kernels: B*C programs, each ITERS*BLOCK elements of one sample. A function of
    D alone (and of interpreter vs compiled): a sample's sums never depend on its batch, and sde_step and
    policy_loss sum the same sample the same way (the on-policy log-ratio is exactly 0)."""
    if interpreted():
        block = max(16, min(next_power_of_2(D), INTERPRETED_BLOCK))
        warps = 4
    else:
        block = next_power_of_2(cdiv(D, FUSED_MIN_PROGRAMS))
        block = min(FUSED_BLOCK_MAX, max(FUSED_BLOCK_MIN, block))
        warps = min(16, max(1, block // (32 * FUSED_ELEMS_PER_THREAD)))
    iters = next_power_of_2(cdiv(D, block * FUSED_MAX_CHUNKS))
    chunks = cdiv(D, block * iters)
    cp = next_power_of_2(chunks)
    return FusedGeometry(block, block.bit_length() - 1, iters, chunks, cp, cp.bit_length() - 1, warps)


def finish_rows(B: int):
    """(RB, log2 RB): rows per tile of the batch finish, the next power of 2 of B (one tile) up to
    FINISH_ROWS_MAX."""
    rb = min(next_power_of_2(B), FINISH_ROWS_MAX)
    return rb, rb.bit_length() - 1


_COUNTERS = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """An int32 buffer of at least ``n`` zeros for the kernels' arrival tickets. The kernels leave it zero, so
    one buffer per (device, stream) is reused by every launch on that stream (stream order keeps launches
    apart). Under CUDA-graph capture each call gets its own buffer (a memset node of the graph), so a graph's
    replays never share counters with work outside it."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
