"""sde_step on Triton: an autograd.Function around kernels/sde_step.py (2 launches forward, 1 backward)."""
from __future__ import annotations

import torch

from grpo_guard import reference as ref
from grpo_guard.kernels import sde_step as K

from .requests import SDERequest
from .triton_launch import DYNAMICS_CODE, LAUNCH_OPTIONS, flat, geometry, sigma_args


class _SDEStep(torch.autograd.Function):
    """forward(v, x, prev_sample | None, noise | None, sigma, sigma_next, eta, dynamics) ->
    (prev_sample if rollout,) log_prob (B,), prev_sample_mean (like x, compute dtype), std_dev_t (B,)."""

    @staticmethod
    def forward(ctx, v, x, prev_sample, noise, sigma, sigma_next, eta, dynamics):
        ctx.set_materialize_grads(False)
        B, shape = x.shape[0], x.shape
        D = x.numel() // B
        cd = ref.compute_dtype(v, x, prev_sample)
        g = geometry(B, D)
        v, x = flat(v), flat(x)
        rollout = prev_sample is None
        xp_out = torch.empty(shape, dtype=x.dtype, device=x.device) if rollout else None
        xp_in = flat(prev_sample) if not rollout else xp_out
        z = flat(noise) if rollout else x
        mean = torch.empty(shape, dtype=cd, device=x.device)
        log_prob = torch.empty(B, dtype=cd, device=x.device)
        std_dev_t = torch.empty(B, dtype=cd, device=x.device)
        part = torch.empty(B * g.chunks, dtype=cd, device=x.device)
        sig_args = sigma_args(sigma, sigma_next, part)
        dyn = DYNAMICS_CODE[dynamics]
        K.sde_step_reduce_kernel[(B * g.chunks,)](
            v, x, xp_in, z, xp_in, mean, part, *sig_args[:4], eta, D, g.chunks, g.iters,
            DYNAMICS=dyn, PER_SAMPLE=sig_args[4], ROLLOUT=rollout, BLOCK=g.block, LOG_BLOCK=g.log_block,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        K.sde_step_finish_kernel[(1,)](
            part, log_prob, std_dev_t, *sig_args[:4], eta, B, g.chunks, D,
            DYNAMICS=dyn, PER_SAMPLE=sig_args[4], RB=g.rows, CP=g.cp, LOG_CP=g.log_cp,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        ctx.save_for_backward(xp_in, mean, sigma if sig_args[4] else None, sigma_next if sig_args[4] else None)
        ctx.scalars = (sig_args[2], sig_args[3], eta, dyn, sig_args[4], D, g, v.dtype, x.dtype)
        ctx.mark_non_differentiable(std_dev_t)
        if rollout:
            return xp_out, log_prob, mean, std_dev_t
        return log_prob, mean, std_dev_t

    @staticmethod
    def backward(ctx, *grads):
        xp, mean, sig_t, nxt_t = ctx.saved_tensors
        sigma, sigma_next, eta, dyn, per_sample, D, g, v_dtype, x_dtype = ctx.scalars
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
            flat(g_mean) if g_mean is not None else dummy, flat(g_lp) if g_lp is not None else dummy,
            g_v if need_v else dummy, g_x if need_x else dummy,
            sig_t if per_sample else dummy, nxt_t if per_sample else dummy, sigma, sigma_next, eta,
            D, g.chunks, g.iters,
            DYNAMICS=dyn, PER_SAMPLE=per_sample, HAS_G_PREV=g_prev is not None, HAS_G_MEAN=g_mean is not None,
            HAS_G_LP=g_lp is not None, NEED_G_V=need_v, NEED_G_X=need_x, BLOCK=g.block,
            num_warps=g.num_warps, **LAUNCH_OPTIONS)
        return g_v, g_x, None, None, None, None, None, None


def sde_step(req: SDERequest) -> ref.SDEStep:
    """Same contract as reference.sde_step (see torch_backend)."""
    out = _SDEStep.apply(req.model_output, req.sample, req.prev_sample, req.noise, req.sigma, req.sigma_next,
                         req.noise_level, req.dynamics)
    if req.prev_sample is None:
        prev_sample, log_prob, mean, std_dev_t = out
    else:
        (log_prob, mean, std_dev_t), prev_sample = out, req.prev_sample
    return ref.SDEStep(prev_sample, log_prob, mean, std_dev_t)
