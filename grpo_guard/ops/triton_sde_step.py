"""sde_step on Triton: an autograd.Function around kernels/sde_step.py.

Two kernel sets, chosen by ``triton_launch.FUSED``: the single-launch forward (``sde_step_fwd_kernel``; the last
program of each row writes its log-prob) with an elementwise backward, or the split forward (reduce + one
finishing program, 2 launches). ``return_mean=False`` skips the latent-sized float32 mean (fused kernels only;
the backward then recomputes mu from x and v, bit for bit).
"""
from __future__ import annotations

import torch

from grpo_guard import reference as ref
from grpo_guard.kernels import sde_step as K

from . import errors
from . import triton_launch as TL
from .requests import SDERequest, device_checks
from .torch_backend import poisoned_sde_step
from .triton_launch import DYNAMICS_CODE, LAUNCH_OPTIONS, batch_strided, flat, geometry, sigma_args

ROW_FIELDS = 3  # kernels/sde_step.py: the fused forward's row buffer (a, b, k)


class _SDEStepFused(torch.autograd.Function):
    """forward(v, x, prev_sample | None, noise | None, sigma, sigma_next, eta, dynamics, return_mean) ->
    (prev_sample if rollout,) log_prob (B,), prev_sample_mean (like x, compute dtype) or None, std_dev_t (B,)."""

    @staticmethod
    def forward(ctx, v, x, prev_sample, noise, sigma, sigma_next, eta, dynamics, return_mean, check):
        ctx.set_materialize_grads(False)
        B, shape = x.shape[0], x.shape
        D = x.numel() // B
        cd = ref.compute_dtype(v, x, prev_sample)
        g = TL.fused_geometry(D)
        (v, sv), (x, sx) = batch_strided(v), batch_strided(x)
        rollout = prev_sample is None
        xp_out = torch.empty(shape, dtype=x.dtype, device=x.device) if rollout else None
        xp, sxp = (xp_out, D) if rollout else batch_strided(prev_sample)
        z, sz = batch_strided(noise) if rollout else (x, sx)
        mean = torch.empty(shape, dtype=cd, device=x.device) if return_mean else None
        n_part = B * g.chunks
        log_prob = torch.empty(B, dtype=cd, device=x.device)
        std_dev_t = torch.empty(B, dtype=cd, device=x.device)
        work = torch.empty(ROW_FIELDS * B + n_part, dtype=cd, device=x.device)
        row, part = work[:ROW_FIELDS * B], work[ROW_FIELDS * B:]
        cnt = TL.counters(x.device, B)
        sig = sigma_args(sigma, sigma_next, work)
        K.sde_step_fwd_kernel[(n_part,)](
            v, x, xp, z, xp, mean if return_mean else work, part, row, cnt,
            errors.word(x.device), log_prob, std_dev_t, *sig[:4], eta, B, D, g.chunks, sv, sx, sxp, sz,
            DYNAMICS=DYNAMICS_CODE[dynamics], PER_SAMPLE=sig[4], ROLLOUT=rollout, WRITE_MEAN=return_mean,
            CHECK=check and sig[4], ERR_BASE=errors.SDE_STEP,
            BLOCK=g.block, LOG_BLOCK=g.log_block, ITERS=g.iters, CP=g.cp, LOG_CP=g.log_cp,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        # the backward reads x' and mu (the saved mean, or x and v to recompute it) and the row constants
        ctx.save_for_backward(xp, mean, None if return_mean else x, None if return_mean else v, row)
        ctx.scalars = (D, g, v.dtype if ctx.needs_input_grad[0] else None,
                       x.dtype if ctx.needs_input_grad[1] else None, (sv, sx, sxp))
        ctx.mark_non_differentiable(std_dev_t)
        if rollout:
            return xp_out, log_prob, mean, std_dev_t
        return log_prob, mean, std_dev_t

    @staticmethod
    def backward(ctx, *grads):
        xp, mean, x, v, row = ctx.saved_tensors
        D, g, v_dtype, x_dtype, strides = ctx.scalars
        if len(grads) == 4:
            g_prev, g_lp, g_mean, _ = grads
        else:
            g_prev, (g_lp, g_mean, _) = None, grads
        if (g_prev is None and g_lp is None and g_mean is None) or not (v_dtype or x_dtype):
            return (None,) * 10
        B = xp.shape[0]
        g_v = torch.empty(xp.shape, dtype=v_dtype, device=xp.device) if v_dtype else None
        g_x = torch.empty(xp.shape, dtype=x_dtype, device=xp.device) if x_dtype else None
        dummy = row
        K.sde_step_bwd_kernel[(B * g.chunks,)](
            v if v is not None else dummy, x if x is not None else dummy, xp, mean if mean is not None else dummy,
            row, flat(g_prev) if g_prev is not None else dummy, flat(g_mean) if g_mean is not None else dummy,
            g_lp if g_lp is not None else dummy, g_v if g_v is not None else dummy,
            g_x if g_x is not None else dummy, B, D, g.chunks, *strides, g_lp.stride(0) if g_lp is not None else 0,
            HAS_MEAN=mean is not None, HAS_G_PREV=g_prev is not None, HAS_G_MEAN=g_mean is not None,
            HAS_G_LP=g_lp is not None, NEED_G_V=g_v is not None, NEED_G_X=g_x is not None, BLOCK=g.block,
            ITERS=g.iters, num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v, g_x, None, None, None, None, None, None, None, None


class _SDEStep(torch.autograd.Function):
    """The split kernels: forward(v, x, prev_sample | None, noise | None, sigma, sigma_next, eta, dynamics) ->
    (prev_sample if rollout,) log_prob (B,), prev_sample_mean (like x, compute dtype), std_dev_t (B,)."""

    @staticmethod
    def forward(ctx, v, x, prev_sample, noise, sigma, sigma_next, eta, dynamics):
        ctx.set_materialize_grads(False)
        B, shape = x.shape[0], x.shape
        D = x.numel() // B
        cd = ref.compute_dtype(v, x, prev_sample)
        g = geometry(B, D)
        (v, sv), (x, sx) = batch_strided(v), batch_strided(x)
        rollout = prev_sample is None
        xp_out = torch.empty(shape, dtype=x.dtype, device=x.device) if rollout else None
        xp_in, sxp = batch_strided(prev_sample) if not rollout else (xp_out, D)
        z, sz = batch_strided(noise) if rollout else (x, sx)
        mean = torch.empty(shape, dtype=cd, device=x.device)
        log_prob = torch.empty(B, dtype=cd, device=x.device)
        std_dev_t = torch.empty(B, dtype=cd, device=x.device)
        part = torch.empty(B * g.chunks, dtype=cd, device=x.device)
        sig_args = sigma_args(sigma, sigma_next, part)
        dyn = DYNAMICS_CODE[dynamics]
        K.sde_step_reduce_kernel[(B * g.chunks,)](
            v, x, xp_in, z, xp_in, mean, part, *sig_args[:4], eta, D, g.chunks, g.iters, sv, sx, sxp, sz,
            DYNAMICS=dyn, PER_SAMPLE=sig_args[4], ROLLOUT=rollout, BLOCK=g.block, LOG_BLOCK=g.log_block,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        K.sde_step_finish_kernel[(1,)](
            part, log_prob, std_dev_t, *sig_args[:4], eta, B, g.chunks, D,
            DYNAMICS=dyn, PER_SAMPLE=sig_args[4], RB=g.rows, CP=g.cp, LOG_CP=g.log_cp,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        ctx.save_for_backward(xp_in, mean, sigma if sig_args[4] else None, sigma_next if sig_args[4] else None)
        ctx.scalars = (sig_args[2], sig_args[3], eta, dyn, sig_args[4], D, g, v.dtype, x.dtype, sxp)
        ctx.mark_non_differentiable(std_dev_t)
        if rollout:
            return xp_out, log_prob, mean, std_dev_t
        return log_prob, mean, std_dev_t

    @staticmethod
    def backward(ctx, *grads):
        xp, mean, sig_t, nxt_t = ctx.saved_tensors
        sigma, sigma_next, eta, dyn, per_sample, D, g, v_dtype, x_dtype, sxp = ctx.scalars
        if len(grads) == 4:
            g_prev, g_lp, g_mean, _ = grads
        else:
            g_prev, (g_lp, g_mean, _) = None, grads
        need_v, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_prev is None and g_lp is None and g_mean is None) or not (need_v or need_x):
            return None, None, None, None, None, None, None, None
        B = mean.shape[0]
        g_v = torch.empty(mean.shape, dtype=v_dtype, device=mean.device) if need_v else None
        g_x = torch.empty(mean.shape, dtype=x_dtype, device=mean.device) if need_x else None
        dummy = mean
        K.sde_step_backward_kernel[(B * g.chunks,)](
            xp, mean, flat(g_prev) if g_prev is not None else dummy,
            flat(g_mean) if g_mean is not None else dummy, g_lp if g_lp is not None else dummy,
            g_v if need_v else dummy, g_x if need_x else dummy,
            sig_t if per_sample else dummy, nxt_t if per_sample else dummy, sigma, sigma_next, eta,
            D, g.chunks, g.iters, sxp, g_lp.stride(0) if g_lp is not None else 0,
            DYNAMICS=dyn, PER_SAMPLE=per_sample, HAS_G_PREV=g_prev is not None, HAS_G_MEAN=g_mean is not None,
            HAS_G_LP=g_lp is not None, NEED_G_V=need_v, NEED_G_X=need_x, BLOCK=g.block,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v, g_x, None, None, None, None, None, None


def sde_step(req: SDERequest) -> ref.SDEStep:
    """Same contract as reference.sde_step (see torch_backend)."""
    args = (req.model_output, req.sample, req.prev_sample, req.noise, req.sigma, req.sigma_next, req.noise_level,
            req.dynamics)
    if TL.FUSED:
        out = _SDEStepFused.apply(*args, req.return_mean, req.check)
    else:
        out = _SDEStep.apply(*args)
    if req.prev_sample is None:
        prev_sample, log_prob, mean, std_dev_t = out
    else:
        (log_prob, mean, std_dev_t), prev_sample = out, req.prev_sample
    out = ref.SDEStep(prev_sample, log_prob, mean if req.return_mean else None, std_dev_t)
    # the fused kernel checks inside; the split ones with torch ops
    return out if TL.FUSED else poisoned_sde_step(out, device_checks(req))
