"""sde_step on Triton: launch code for kernels/sde_step.py, an autograd.Function (eager) around it, and the same
forward/backward for the torch.library operators (grpo_guard/ops/library.py).

Two kernel sets, chosen by ``triton_launch.FUSED`` when the forward runs: the single-launch forward
(``sde_step_fwd_kernel``; the last program of each row writes its log-prob) with an elementwise backward, or the
split forward (reduce + one finishing program, 2 launches). ``return_mean=False`` skips the latent-sized float32
mean (fused kernels; the backward then recomputes mu from x and v, bit for bit).
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_guard import reference as ref
from grpo_guard.kernels import sde_step as K

from . import errors
from . import triton_launch as TL
from .requests import SDERequest
from .triton_launch import DYNAMICS_CODE, LAUNCH_OPTIONS, batch_strided, flat, geometry
from .triton_policy_loss import eager_launch, no_launch, sizes

ROW_FIELDS = 3  # kernels/sde_step.py: the fused forward's row buffer (a, b, k)


def forward(v, x, prev_sample: Optional[torch.Tensor], noise: Optional[torch.Tensor], sig_t, nxt_t, sig_f: float,
            nxt_f: float, eta: float, dynamics: str, return_mean: bool, check: bool, fused: bool,
            counters: Optional[torch.Tensor], err: torch.Tensor, launch=eager_launch):
    """Launch the forward: a rollout (``noise`` given: x' = mu + s*noise, stored in x's dtype) or the scoring of
    ``prev_sample``. Returns (x' (rollout) or an empty tensor, log_prob (B,), mean (like x, compute dtype; empty
    unless return_mean or the split kernels), std_dev_t (B,), work): ``work`` holds the per-row constants the
    backward reads (fused: a view of one buffer with the chunk partials; split: empty)."""
    shape = x.shape
    cd = ref.compute_dtype(v, x, prev_sample)
    rollout = prev_sample is None
    xp_out = torch.empty(shape if rollout else (0,), dtype=x.dtype, device=x.device)
    log_prob = torch.empty(shape[0], dtype=cd, device=x.device)
    std_dev_t = torch.empty(shape[0], dtype=cd, device=x.device)
    mean = torch.empty(shape if return_mean or not fused else (0,), dtype=cd, device=x.device)
    if launch is no_launch:
        return xp_out, log_prob, mean, std_dev_t, torch.empty(ROW_FIELDS * shape[0] if fused else 0, dtype=cd,
                                                              device=x.device)
    B, D = sizes(x)
    (v, sv), (x, sx) = batch_strided(v), batch_strided(x)
    xp, sxp = (xp_out, D) if rollout else batch_strided(prev_sample)
    z, sz = batch_strided(noise) if rollout else (x, sx)
    per_sample = sig_t is not None
    dyn = DYNAMICS_CODE[dynamics]
    if fused:
        g = TL.fused_geometry(D)
        n_part = B * g.chunks
        work = torch.empty(ROW_FIELDS * B + n_part, dtype=cd, device=x.device)
        row, part = work[:ROW_FIELDS * B], work[ROW_FIELDS * B:]
        if counters is None:
            counters = torch.zeros(B, dtype=torch.int32, device=x.device)
        launch(K.sde_step_fwd_kernel, (n_part,),
               v, x, xp, z, xp, mean if return_mean else work, part, row, counters, err, log_prob, std_dev_t,
               sig_t if per_sample else work, nxt_t if per_sample else work, sig_f, nxt_f, eta, B, D, g.chunks,
               sv, sx, sxp, sz,
               DYNAMICS=dyn, PER_SAMPLE=per_sample, ROLLOUT=rollout, WRITE_MEAN=return_mean,
               CHECK=check and per_sample, ERR_BASE=errors.SDE_STEP, BLOCK=g.block, LOG_BLOCK=g.log_block,
               ITERS=g.iters, CP=g.cp, LOG_CP=g.log_cp, LEAN=TL.LEAN, num_warps=g.num_warps,
               **TL.forward_options(v, x, xp))
        return xp_out, log_prob, mean, std_dev_t, row
    g = geometry(B, D)  # the split backward reads the mean
    part = torch.empty(B * g.chunks, dtype=cd, device=x.device)
    launch(K.sde_step_reduce_kernel, (B * g.chunks,),
           v, x, xp, z, xp, mean, part, sig_t if per_sample else part, nxt_t if per_sample else part,
           sig_f, nxt_f, eta, D, g.chunks, g.iters, sv, sx, sxp, sz,
           DYNAMICS=dyn, PER_SAMPLE=per_sample, ROLLOUT=rollout, BLOCK=g.block, LOG_BLOCK=g.log_block,
           num_warps=g.num_warps, **LAUNCH_OPTIONS)
    launch(K.sde_step_finish_kernel, (1,),
           part, log_prob, std_dev_t, err, sig_t if per_sample else part, nxt_t if per_sample else part,
           sig_f, nxt_f, eta, B, g.chunks, D,
           DYNAMICS=dyn, PER_SAMPLE=per_sample, CHECK=check and per_sample, ERR_BASE=errors.SDE_STEP, RB=g.rows, CP=g.cp, LOG_CP=g.log_cp,
           num_warps=g.num_warps, **LAUNCH_OPTIONS)
    return xp_out, log_prob, mean, std_dev_t, part[:0]


def backward(g_prev: Optional[torch.Tensor], g_lp: Optional[torch.Tensor], g_mean: Optional[torch.Tensor],
             v: Optional[torch.Tensor], x: Optional[torch.Tensor], xp, mean: Optional[torch.Tensor], work,
             sig_t, nxt_t, sig_f: float, nxt_f: float, eta: float, dynamics: str, fused: bool,
             v_dtype: Optional[torch.dtype], x_dtype: Optional[torch.dtype], launch=eager_launch):
    """(grad w.r.t. v or None, grad w.r.t. x or None) from the gradients of x' (rollout), log_prob and the mean:
    g_mu = g_prev + g_mean + g_lp k (x' - mu); g_v = b g_mu, g_x = a g_mu. ``mean`` None: recomputed from x, v."""
    g_v = torch.empty(xp.shape, dtype=v_dtype, device=xp.device) if v_dtype is not None else None
    g_x = torch.empty(xp.shape, dtype=x_dtype, device=xp.device) if x_dtype is not None else None
    if launch is no_launch:
        return g_v, g_x
    B, D = sizes(xp)
    xp, sxp = batch_strided(xp)
    g_prev = flat(g_prev) if g_prev is not None else None
    g_mean = flat(g_mean) if g_mean is not None else None
    s_glp = g_lp.stride(0) if g_lp is not None else 0
    dummy = work
    if fused:
        g = TL.fused_geometry(D)
        (v, sv), (x, sx) = (batch_strided(v), batch_strided(x)) if mean is None else ((dummy, 0), (dummy, 0))
        launch(K.sde_step_bwd_kernel, (B * g.chunks,),
               v, x, xp, mean if mean is not None else dummy, work,
               g_prev if g_prev is not None else dummy, g_mean if g_mean is not None else dummy,
               g_lp if g_lp is not None else dummy, g_v if g_v is not None else dummy,
               g_x if g_x is not None else dummy, B, D, g.chunks, sv, sx, sxp, s_glp,
               HAS_MEAN=mean is not None, HAS_G_PREV=g_prev is not None, HAS_G_MEAN=g_mean is not None,
               HAS_G_LP=g_lp is not None, NEED_G_V=g_v is not None, NEED_G_X=g_x is not None, BLOCK=g.block,
               ITERS=g.iters, LEAN=TL.LEAN, num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v, g_x
    g = geometry(B, D)
    per_sample = sig_t is not None
    launch(K.sde_step_backward_kernel, (B * g.chunks,),
           xp, mean, g_prev if g_prev is not None else mean, g_mean if g_mean is not None else mean,
           g_lp if g_lp is not None else mean, g_v if g_v is not None else mean, g_x if g_x is not None else mean,
           sig_t if per_sample else mean, nxt_t if per_sample else mean, sig_f, nxt_f, eta,
           D, g.chunks, g.iters, sxp, s_glp,
           DYNAMICS=DYNAMICS_CODE[dynamics], PER_SAMPLE=per_sample, HAS_G_PREV=g_prev is not None,
           HAS_G_MEAN=g_mean is not None, HAS_G_LP=g_lp is not None, NEED_G_V=g_v is not None,
           NEED_G_X=g_x is not None, BLOCK=g.block, num_warps=g.num_warps, **LAUNCH_OPTIONS)
    return g_v, g_x


def sigmas(req):
    """(sig_t, nxt_t, sig_f, nxt_f): float64 (B,) tensors and zeros, or None and the floats."""
    if isinstance(req.sigma, torch.Tensor):
        return req.sigma, req.sigma_next, 0.0, 0.0
    return None, None, float(req.sigma), float(req.sigma_next)


class _SDEStep(torch.autograd.Function):
    """Eager: forward(v, x, prev_sample | None, noise | None, req) -> (x' or empty, log_prob, mean or empty,
    std_dev_t)."""

    @staticmethod
    def forward(ctx, v, x, prev_sample, noise, req):
        ctx.set_materialize_grads(False)
        fused = TL.FUSED
        sig_t, nxt_t, sig_f, nxt_f = sigmas(req)
        xp_out, log_prob, mean, std_dev_t, work = forward(
            v, x, prev_sample, noise, sig_t, nxt_t, sig_f, nxt_f, req.noise_level, req.dynamics, req.return_mean,
            req.check, fused, TL.counters(x.device, x.shape[0]) if fused else None, errors.word(x.device))
        rollout = prev_sample is None
        keep_mean = mean.numel() > 0
        ctx.save_for_backward(None if keep_mean else v, None if keep_mean else x,
                              xp_out if rollout else prev_sample, mean if keep_mean else None, work, sig_t, nxt_t)
        ctx.args = (sig_f, nxt_f, req.noise_level, req.dynamics, fused,
                    v.dtype if ctx.needs_input_grad[0] else None, x.dtype if ctx.needs_input_grad[1] else None)
        ctx.rollout = rollout
        ctx.mark_non_differentiable(std_dev_t)
        return xp_out, log_prob, mean, std_dev_t

    @staticmethod
    def backward(ctx, g_prev, g_lp, g_mean, _g_std):
        v, x, xp, mean, work, sig_t, nxt_t = ctx.saved_tensors
        if not ctx.rollout:
            g_prev = None
        if g_prev is None and g_lp is None and g_mean is None or ctx.args[-2:] == (None, None):
            return None, None, None, None, None
        g_v, g_x = backward(g_prev, g_lp, g_mean, v, x, xp, mean, work, sig_t, nxt_t, *ctx.args)
        return g_v, g_x, None, None, None


def sde_step(req: SDERequest) -> ref.SDEStep:
    """Same contract as reference.sde_step (see torch_backend)."""
    xp_out, log_prob, mean, std_dev_t = _SDEStep.apply(req.model_output, req.sample, req.prev_sample, req.noise, req)
    return ref.SDEStep(xp_out if req.prev_sample is None else req.prev_sample, log_prob,
                       mean if req.return_mean else None, std_dev_t)
