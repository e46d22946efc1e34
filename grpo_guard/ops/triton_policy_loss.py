"""policy_loss on Triton: launch code for kernels/policy_loss.py, an autograd.Function (eager) around it, and the
same forward/backward for the torch.library operators (grpo_guard/ops/library.py).

Two kernel sets, chosen by ``triton_launch.FUSED`` when the forward runs: the single-launch forward
(``policy_loss_fwd_kernel``: reduce, then the last program of each row finishes the row and the last row the
batch) with an elementwise backward, or the split forward (reduce + one finishing program, 2 launches). Host
work: torch.empty and views; no other torch op on the hot path, no copy of batch-strided latents.
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_guard import reference as ref
from grpo_guard.kernels import policy_loss as K

from . import errors
from . import triton_launch as TL
from .layout import n_stats, stats_dict
from .requests import LossRequest
from .triton_launch import DYNAMICS_CODE, LAUNCH_OPTIONS, batch_strided, flat, geometry

METHOD_CODE = {m: i for i, m in enumerate(ref.METHODS)}  # grpo, mean_revised, ratio_norm, guard, dppo
OLD_CODE = {"old_log_prob": 0, "old_prev_sample_mean": 1, "old_model_output": 2}
ROW_FIELDS = 8  # kernels/policy_loss.py: the fused forward's row buffer (k_u, k_d, a, b, loss, r - 1, clipped, KL)


def eager_launch(kernel, grid, *args, **kwargs):
    """Launch a kernel now (the eager path); the operators pass wrap_triton's launcher or :func:`no_launch`."""
    kernel[grid](*args, **kwargs)


def no_launch(kernel, grid, *args, **kwargs):
    """The fake implementations' launcher: the forward/backward functions only allocate their outputs."""


def row_fields(fused: bool) -> int:
    """Per-row constants the forward leaves for the backward: k_u, k_d, a, b, loss, r - 1, clipped, KL (fused) or
    k_u, k_d (split)."""
    return ROW_FIELDS if fused else 2


def sizes(x):
    """(B, D) as Python ints: the launch geometry is integer arithmetic on them (under torch.compile with dynamic
    shapes this specializes the latent size, which a training run does not change)."""
    B = int(x.shape[0])
    return B, int(x.numel()) // B


def forward(v, x, xp, old: Optional[torch.Tensor], adv, old_lp: Optional[torch.Tensor], sig_t, nxt_t,
            sig_f: float, nxt_f: float, eta: float, dynamics: str, method: str, clip_range: float,
            adv_clip_max: float, guard_weight: str, old_kind: int, check: bool, fused: bool,
            counters: Optional[torch.Tensor], err: torch.Tensor, launch=eager_launch, kl_threshold: float = 1e-5):
    """Launch the forward. ``old``: old_prev_sample_mean (old_kind 1) or old_model_output (2), None for old_log_prob
    (0); sigmas as float64 (B,) tensors (sig_t, nxt_t) or floats (sig_f, nxt_f). ``counters``: zeroed int32 (>= B+1)
    for the fused kernel (None: allocated here). Returns (loss 0-dim, stats (layout.n_stats,), work), ``work`` the
    per-row constants the backward reads (a view of one buffer with the chunk partials, which only the forward reads)."""
    cd = ref.compute_dtype(v, x, xp, old)
    stats = torch.empty(n_stats(x.shape[0], method), dtype=cd, device=x.device)
    loss = torch.empty((), dtype=cd, device=x.device)
    if launch is no_launch:
        return loss, stats, torch.empty(row_fields(fused) * x.shape[0], dtype=cd, device=x.device)
    B, D = sizes(x)
    (v, sv), (x, sx), (xp, sxp) = batch_strided(v), batch_strided(x), batch_strided(xp)
    old, so = batch_strided(old) if old is not None else (x, sx)
    adv, old_lp = flat(adv), flat(old_lp) if old_lp is not None else None  # (B,): read with stride 1
    per_sample = sig_t is not None
    lo, hi = ref.clip_bounds(clip_range)
    dyn, meth = DYNAMICS_CODE[dynamics], METHOD_CODE[method]
    if fused:
        g = TL.fused_geometry(D)
        rb, log_rb = TL.finish_rows(B)
        n_part = B * g.chunks
        work = torch.empty(ROW_FIELDS * B + 2 * n_part, dtype=cd, device=x.device)
        row, part = work[:ROW_FIELDS * B], work[ROW_FIELDS * B:]
        if counters is None:
            counters = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
        launch(K.policy_loss_fwd_kernel, (n_part,),
               v, x, xp, old, adv, old_lp if old_lp is not None else work, part, row, counters, err, loss, stats,
               sig_t if per_sample else work, nxt_t if per_sample else work, sig_f, nxt_f, eta, lo, hi, adv_clip_max,
               kl_threshold, B, D, g.chunks, n_part, sv, sx, sxp, so,
               DYNAMICS=dyn, PER_SAMPLE=per_sample, OLD=old_kind, METHOD=meth, BETA_DT=guard_weight == "beta_dt",
               CHECK=check, ERR_BASE=errors.POLICY_LOSS, BLOCK=g.block, LOG_BLOCK=g.log_block, ITERS=g.iters,
               CP=g.cp, LOG_CP=g.log_cp, RB=rb, LOG_RB=log_rb, LEAN=TL.LEAN, ONE_TILE=TL.LEAN and rb >= B,
               num_warps=g.num_warps,
               **TL.forward_options(v, x, xp, *([old] if old_kind == 1 else [])))
        return loss, stats, row
    g = geometry(B, D)
    n_part = B * g.chunks
    work = torch.empty(2 * B + 2 * n_part, dtype=cd, device=x.device)
    coef, part = work[:2 * B], work[2 * B:]
    launch(K.policy_loss_reduce_kernel, (n_part,),
           v, x, xp, old, part, sig_t if per_sample else work, nxt_t if per_sample else work, sig_f, nxt_f, eta,
           D, g.chunks, g.iters, n_part, sv, sx, sxp, so,
           DYNAMICS=dyn, PER_SAMPLE=per_sample, OLD=old_kind, BLOCK=g.block, LOG_BLOCK=g.log_block,
           num_warps=g.num_warps, **LAUNCH_OPTIONS)
    launch(K.policy_loss_finish_kernel, (1,),
           part, adv, old_lp if old_lp is not None else work, coef, loss, stats, err,
           sig_t if per_sample else work, nxt_t if per_sample else work, sig_f, nxt_f, eta, lo, hi, adv_clip_max,
           kl_threshold, B, g.chunks, D, n_part,
           DYNAMICS=dyn, PER_SAMPLE=per_sample, OLD=old_kind, METHOD=meth, BETA_DT=guard_weight == "beta_dt",
           CHECK=check, ERR_BASE=errors.POLICY_LOSS, RB=g.rows, CP=g.cp, LOG_CP=g.log_cp, num_warps=g.num_warps, **LAUNCH_OPTIONS)
    return loss, stats, coef


def saved_inputs(old_kind: int, method: str):
    """Which of (v, x, x', old) the backward reads (both kernel sets): (need_v, need_x, need_old); x' always. v only
    for old_log_prob or when k_d != 0 (grpo with an old mean); x unless the old mean is given without k_d."""
    need_delta = _needs_delta(old_kind, method)
    return old_kind == 0 or need_delta, old_kind != 1 or need_delta, old_kind != 0


def _needs_delta(old_kind: int, method: str) -> bool:
    """k_d != 0: an old mean is given and the method's log-ratio has the S2 term (grpo's, dppo's plain log r)."""
    return old_kind != 0 and method in ("grpo", "dppo")


def backward(g_loss, v: Optional[torch.Tensor], x: Optional[torch.Tensor], xp, old: Optional[torch.Tensor], work,
             sig_t, nxt_t, sig_f: float, nxt_f: float, eta: float, dynamics: str, method: str, old_kind: int,
             fused: bool, v_dtype: torch.dtype, launch=eager_launch):
    """grad of the loss w.r.t. the velocity (contiguous, ``v_dtype``), one elementwise launch; ``g_loss`` 0-dim."""
    g_v = torch.empty(xp.shape, dtype=v_dtype, device=xp.device)
    if launch is no_launch:
        return g_v
    B, D = sizes(xp)
    (xp, sxp) = batch_strided(xp)
    (v, sv) = batch_strided(v) if v is not None else (xp, sxp)
    (x, sx) = batch_strided(x) if x is not None else (xp, sxp)
    (old, so) = batch_strided(old) if old is not None else (xp, sxp)
    need_delta = _needs_delta(old_kind, method)
    if fused:
        g = TL.fused_geometry(D)
        launch(K.policy_loss_bwd_kernel, (B * g.chunks,),
               v, x, xp, old, work, g_loss, g_v, B, D, g.chunks, sv, sx, sxp, so,
               OLD=old_kind, NEED_DELTA=need_delta, BLOCK=g.block, ITERS=g.iters, LEAN=TL.LEAN,
               num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v
    g = geometry(B, D)
    per_sample = sig_t is not None
    launch(K.policy_loss_backward_kernel, (B * g.chunks,),
           v, x, xp, old, work, g_loss, g_v, sig_t if per_sample else work, nxt_t if per_sample else work,
           sig_f, nxt_f, eta, B, D, g.chunks, g.iters, sv, sx, sxp, so,
           DYNAMICS=DYNAMICS_CODE[dynamics], PER_SAMPLE=per_sample, OLD=old_kind, NEED_DELTA=need_delta,
           BLOCK=g.block, num_warps=g.num_warps, **LAUNCH_OPTIONS)
    return g_v


class _PolicyLoss(torch.autograd.Function):
    """Eager: forward(v, x, x', old | None, advantages, old_log_prob | None, req, old_kind) -> (loss, stats)."""

    @staticmethod
    def forward(ctx, v, x, xp, old, adv, old_lp, req, old_kind):
        ctx.set_materialize_grads(False)  # no zero gradient made for the stats output
        fused = TL.FUSED
        sig_t, nxt_t, sig_f, nxt_f = _sigmas(req)
        loss, stats, work = forward(
            v, x, xp, old, adv, old_lp, sig_t, nxt_t, sig_f, nxt_f, req.noise_level, req.dynamics, req.method,
            req.clip_range, req.adv_clip_max, req.guard_weight, old_kind, req.check, fused,
            TL.counters(x.device, x.shape[0] + 1) if fused else None, errors.word(x.device),
            kl_threshold=req.kl_threshold)
        need_v, need_x, need_old = saved_inputs(old_kind, req.method)
        ctx.save_for_backward(v if need_v else None, x if need_x else None, xp, old if need_old else None, work,
                              sig_t, nxt_t)
        ctx.args = (sig_f, nxt_f, req.noise_level, req.dynamics, req.method, old_kind, fused, v.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        if g_loss is None:
            return (None,) * 8
        v, x, xp, old, work, sig_t, nxt_t = ctx.saved_tensors
        g_v = backward(g_loss, v, x, xp, old, work, sig_t, nxt_t, *ctx.args)
        return g_v, None, None, None, None, None, None, None


def _sigmas(req: LossRequest):
    """(sig_t, nxt_t, sig_f, nxt_f): float64 (B,) tensors and zeros, or None and the floats."""
    if isinstance(req.sigma, torch.Tensor):
        return req.sigma, req.sigma_next, 0.0, 0.0
    return None, None, float(req.sigma), float(req.sigma_next)


def old_input(req: LossRequest):
    """(old tensor or None, old_kind)."""
    if req.old_model_output is not None:
        return req.old_model_output, OLD_CODE["old_model_output"]
    if req.old_prev_sample_mean is not None:
        return req.old_prev_sample_mean, OLD_CODE["old_prev_sample_mean"]
    return None, OLD_CODE["old_log_prob"]


def policy_loss(req: LossRequest):
    """Same contract as reference.policy_loss: (loss, stats); stats are views of one detached buffer."""
    B = req.sample.shape[0]
    old, old_kind = old_input(req)
    loss, stats = _PolicyLoss.apply(req.model_output, req.sample, req.prev_sample, old, req.advantages,
                                    req.old_log_prob, req, old_kind)
    return loss, stats_dict(stats, B, old_kind != 0, req.method)
