"""policy_loss on Triton: an autograd.Function around kernels/policy_loss.py.

Two kernel sets, chosen by ``triton_launch.FUSED``: the single-launch forward (``policy_loss_fwd_kernel``: reduce,
then the last program of each row finishes the row and the last row finishes the batch) with an elementwise
backward, or the split forward (reduce + one finishing program, 2 launches). Host work: torch.empty and views;
no other torch op on the hot path.
"""
from __future__ import annotations

import torch

from grpo_guard import reference as ref
from grpo_guard.kernels import policy_loss as K

from . import errors
from . import triton_launch as TL
from .requests import LossRequest, device_checks
from .torch_backend import poisoned_loss
from .triton_launch import DYNAMICS_CODE, LAUNCH_OPTIONS, batch_strided, flat, geometry, sigma_args

METHOD_CODE = {m: i for i, m in enumerate(ref.METHODS)}  # grpo, mean_revised, ratio_norm, guard
ROW_FIELDS = 7  # kernels/policy_loss.py: the fused forward's row buffer (k_u, k_d, a, b, loss, r - 1, clipped)


def _fused_forward(ctx, v, x, xp, old, advantages, old_log_prob, stats, sigma, sigma_next, req, old_kind):
    B = x.shape[0]
    D = x.numel() // B
    cd = stats.dtype
    g = TL.fused_geometry(D)
    rb, log_rb = TL.finish_rows(B)
    (v, sv), (x, sx), (xp, sxp) = batch_strided(v), batch_strided(x), batch_strided(xp)
    old, so = batch_strided(old) if old is not None else (x, sx)
    n_part = B * g.chunks
    work = torch.empty(ROW_FIELDS * B + 2 * n_part, dtype=cd, device=x.device)
    row, part = work[:ROW_FIELDS * B], work[ROW_FIELDS * B:]
    loss = torch.empty((), dtype=cd, device=x.device)
    cnt = TL.counters(x.device, B + 1)
    sig = sigma_args(sigma, sigma_next, work)
    lo, hi = ref.clip_bounds(req.clip_range)
    method = METHOD_CODE[req.method]
    K.policy_loss_fwd_kernel[(n_part,)](
        v, x, xp, old, advantages, old_log_prob if old_log_prob is not None else work, part, row, cnt,
        errors.word(x.device), loss, stats, *sig[:4], req.noise_level, lo, hi, req.adv_clip_max, B, D, g.chunks,
        n_part, sv, sx, sxp, so, DYNAMICS=DYNAMICS_CODE[req.dynamics], PER_SAMPLE=sig[4], OLD=old_kind, METHOD=method,
        BETA_DT=req.guard_weight == "beta_dt", CHECK=req.check, ERR_BASE=errors.POLICY_LOSS, BLOCK=g.block, LOG_BLOCK=g.log_block, ITERS=g.iters,
        CP=g.cp, LOG_CP=g.log_cp, RB=rb, LOG_RB=log_rb, num_warps=g.num_warps, **LAUNCH_OPTIONS)
    need_delta = old_kind != 0 and method == 0
    # only what the backward reads: v for OLD 0 or when k_d != 0; x unless OLD 1 without Delta
    ctx.save_for_backward(v if (old_kind == 0 or need_delta) else None,
                          x if (old_kind != 1 or need_delta) else None, xp, old if old_kind else None, row)
    ctx.scalars = (True, old_kind, need_delta, D, g, (sv, sx, sxp, so))
    ctx.v_dtype = v.dtype
    return loss


def _split_forward(ctx, v, x, xp, old, advantages, old_log_prob, stats, sigma, sigma_next, req, old_kind):
    B = x.shape[0]
    D = x.numel() // B
    cd = stats.dtype
    g = geometry(B, D)
    (v, sv), (x, sx), (xp, sxp) = batch_strided(v), batch_strided(x), batch_strided(xp)
    old, so = batch_strided(old) if old is not None else (x, sx)
    n_part = B * g.chunks
    work = torch.empty(2 * B + 2 * n_part, dtype=cd, device=x.device)
    coef, part = work[:2 * B], work[2 * B:]
    loss = torch.empty((), dtype=cd, device=x.device)
    sig = sigma_args(sigma, sigma_next, work)
    dyn = DYNAMICS_CODE[req.dynamics]
    lo, hi = ref.clip_bounds(req.clip_range)
    method = METHOD_CODE[req.method]
    K.policy_loss_reduce_kernel[(n_part,)](
        v, x, xp, old, part, *sig[:4], req.noise_level, D, g.chunks, g.iters, n_part, sv, sx, sxp, so,
        DYNAMICS=dyn, PER_SAMPLE=sig[4], OLD=old_kind, BLOCK=g.block, LOG_BLOCK=g.log_block,
        num_warps=g.num_warps, **LAUNCH_OPTIONS)
    K.policy_loss_finish_kernel[(1,)](
        part, advantages, old_log_prob if old_log_prob is not None else work, coef, loss, stats,
        *sig[:4], req.noise_level, lo, hi, req.adv_clip_max, B, g.chunks, D, n_part,
        DYNAMICS=dyn, PER_SAMPLE=sig[4], OLD=old_kind, METHOD=method, BETA_DT=req.guard_weight == "beta_dt",
        RB=g.rows, CP=g.cp, LOG_CP=g.log_cp, num_warps=g.num_warps, **LAUNCH_OPTIONS)
    ctx.save_for_backward(v, x, xp, old, coef, sigma if sig[4] else None, sigma_next if sig[4] else None)
    ctx.scalars = (False, sig[2], sig[3], req.noise_level, dyn, sig[4], old_kind,
                   old_kind != 0 and method == 0, D, g, (sv, sx, sxp, so))
    return loss


class _PolicyLoss(torch.autograd.Function):
    """forward(v, x, x', old | None, advantages, old_log_prob | None, stats, req) -> loss (0-dim).
    ``old`` is old_prev_sample_mean (OLD 1) or old_model_output (OLD 2); ``stats`` (4 + 2B,) is filled."""

    @staticmethod
    def forward(ctx, v, x, xp, old, advantages, old_log_prob, stats, sigma, sigma_next, req, old_kind):
        fwd = _fused_forward if TL.FUSED else _split_forward
        return fwd(ctx, v, x, xp, old, advantages, old_log_prob, stats, sigma, sigma_next, req, old_kind)

    @staticmethod
    def backward(ctx, g_loss):
        if ctx.scalars[0]:
            v, x, xp, old, row = ctx.saved_tensors
            _, old_kind, need_delta, D, g, strides = ctx.scalars
            B = xp.shape[0]
            g_v = torch.empty(xp.shape, dtype=ctx.v_dtype, device=xp.device)  # contiguous
            K.policy_loss_bwd_kernel[(B * g.chunks,)](
                v if v is not None else xp, x if x is not None else xp, xp, old if old is not None else xp, row,
                g_loss, g_v, B, D, g.chunks, *strides, OLD=old_kind, NEED_DELTA=need_delta, BLOCK=g.block, ITERS=g.iters,
                num_warps=g.num_warps, **LAUNCH_OPTIONS)
            return g_v, None, None, None, None, None, None, None, None, None, None
        v, x, xp, old, coef, sig_t, nxt_t = ctx.saved_tensors
        _, sigma, sigma_next, eta, dyn, per_sample, old_kind, need_delta, D, g, strides = ctx.scalars
        B = x.shape[0]
        g_v = torch.empty(x.shape, dtype=v.dtype, device=v.device)
        K.policy_loss_backward_kernel[(B * g.chunks,)](
            v, x, xp, old, coef, g_loss, g_v, sig_t if per_sample else coef, nxt_t if per_sample else coef,
            sigma, sigma_next, eta, B, D, g.chunks, g.iters, *strides,
            DYNAMICS=dyn, PER_SAMPLE=per_sample, OLD=old_kind, NEED_DELTA=need_delta, BLOCK=g.block,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v, None, None, None, None, None, None, None, None, None, None


def policy_loss(req: LossRequest):
    """Same contract as reference.policy_loss: (loss, stats); stats are views of one detached buffer."""
    B = req.sample.shape[0]
    if req.old_model_output is not None:
        old, old_kind = req.old_model_output, 2
    elif req.old_prev_sample_mean is not None:
        old, old_kind = req.old_prev_sample_mean, 1
    else:
        old, old_kind = None, 0
    cd = ref.compute_dtype(req.model_output, req.sample, req.prev_sample, req.old_prev_sample_mean,
                           req.old_model_output)
    stats = torch.empty(4 + 2 * B, dtype=cd, device=req.sample.device)
    old_log_prob = flat(req.old_log_prob) if req.old_log_prob is not None else None
    loss = _PolicyLoss.apply(req.model_output, req.sample, req.prev_sample, old, flat(req.advantages),
                             old_log_prob, stats, req.sigma, req.sigma_next, req, old_kind)
    out = {"ratio_mean": stats[0], "ratio_std": stats[1], "clipfrac": stats[2], "approx_kl": stats[3],
           "log_ratio": stats[4:4 + B]}
    if old_kind:
        out["bias"] = stats[4 + B:]
    if not TL.FUSED:  # the fused kernel checks inside; the split ones with torch ops
        return poisoned_loss(loss, out, device_checks(req))
    return loss, out
