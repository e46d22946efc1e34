"""Policy-loss kernels (SPEC §4-6): forward = reduce + finish (2 launches), backward = 1 elementwise launch.

OLD (constexpr) says what the rollout left: 0 old_log_prob (grpo only), 1 old_prev_sample_mean,
2 old_model_output. Per sample i, with u = x' - mu_old and Delta = mu_theta - mu_old (OLD 1) or
b*(v - v_old) (OLD 2), the reduce kernel writes chunk partials of sum u*Delta and sum Delta^2 (OLD 1, 2)
or of sum (x' - mu_theta)^2 with exactly sde_step's chunking and helpers (OLD 0). The finish kernel turns
them into log-ratios (closed forms, reference.log_ratios), the clipped surrogate, the stats and, per
sample, the backward coefficients k_u, k_d of  grad_v = (k_u*u + k_d*Delta) * grad_loss  (OLD 0:
u = x' - mu_theta, k_d = 0). METHOD: 0 grpo, 1 mean_revised, 2 ratio_norm, 3 guard.
"""
import triton
import triton.language as tl

from .common import (CPS, accumulate_sq_dev, chunk_of_program, load_sigmas, log_prob_from_total, rounded_for,
                     row_step_coefficients, row_totals, step_coefficients, transition_mean, tree_sum)


@triton.jit
def expm1_f64(x):
    """exp(x) - 1 in float64 without cancellation near 0 (Kahan: (u - 1) * x / log u, u = exp x)."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where((um1 == 0.0) | (um1 == -1.0), 1.0, um1)
    r = tl.where(um1 == 0.0, x, tl.where(um1 == -1.0, -1.0, safe * x / tl.log(tl.where(um1 == 0.0, 2.0, u))))
    return tl.where(tl.abs(x) > 0.5, um1, r)


@triton.jit
def policy_loss_reduce_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, part_ptr,
                              sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                              D, C, ITERS, NP,
                              DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                              BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """part[p] = chunk sum of u*Delta (OLD 1, 2) or (x'-mu)^2 (OLD 0); part[NP + p] = chunk sum of Delta^2."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    CD: tl.constexpr = part_ptr.dtype.element_ty
    _, _, a64, b64, _, _ = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row, DYNAMICS,
                                                  PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    acc1 = tl.zeros([BLOCK], CD)
    acc2 = tl.zeros([BLOCK], CD)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(CD)
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(CD)
        xp = tl.load(xp_ptr + base + offs, mask=m, other=0.0).to(CD)
        if OLD == 0:
            acc1 = accumulate_sq_dev(acc1, xp, transition_mean(x, v, a, b), m)
        else:
            if OLD == 1:
                mu_old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(CD)
                delta = transition_mean(x, v, a, b) - mu_old
            else:
                v_old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(CD)
                mu_old = transition_mean(x, v_old, a, b)
                delta = b * (v - v_old)
            u = xp - mu_old
            acc1 += tl.where(m, u * delta, 0.0)
            acc2 += tl.where(m, delta * delta, 0.0)
    tl.store(part_ptr + pid, tree_sum(acc1, LOG_BLOCK))
    if OLD != 0:
        tl.store(part_ptr + NP + pid, tree_sum(acc2, LOG_BLOCK))


@triton.jit
def policy_loss_finish_kernel(part_ptr, adv_ptr, old_lp_ptr, coef_ptr, loss_ptr, stats_ptr,
                              sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                              lo: tl.float64, hi: tl.float64, adv_max: tl.float64,
                              B, C, D, NP,
                              DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                              METHOD: tl.constexpr, BETA_DT: tl.constexpr,
                              RB: tl.constexpr, CP: tl.constexpr, LOG_CP: tl.constexpr):
    """One program over all samples, RB rows at a time. Per row (reference.log_ratios / clipped_surrogate):
    log-ratio, ratio = exp, clip on the log-ratio against [lo, hi], per-sample loss w*max(-A r, -A r_clip),
    dL/dlog_ratio mirroring autograd's max/clamp rule (ties split 1/2), and k_u, k_d -> coef[0:B], coef[B:2B].
    stats = [ratio_mean, ratio_std, clipfrac, approx_kl, log_ratio (B), bias (B)], ratio stats from
    expm1(log_ratio) (reference.summarize); loss = mean_i per-sample loss."""
    CD: tl.constexpr = loss_ptr.dtype.element_ty
    lo = lo + tl.zeros([], tl.float64)  # exact float64 in both modes (see common.load_sigmas)
    hi = hi + tl.zeros([], tl.float64)
    adv_max = adv_max + tl.zeros([], tl.float64)
    s_loss = tl.zeros([RB], tl.float64)
    s_exc = tl.zeros([RB], tl.float64)
    s_exc2 = tl.zeros([RB], tl.float64)
    s_clip = tl.zeros([RB], tl.float64)
    s_lr2 = tl.zeros([RB], tl.float64)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        rm = rows < B
        sig, nxt = load_sigmas(sig_ptr, nxt_ptr, sigma, sigma_next, rows, rm, PER_SAMPLE)
        _, std, _, b, beta, dt = step_coefficients(sig, nxt, eta, DYNAMICS)
        var = std * std
        if OLD == 0:
            lp = log_prob_from_total(row_totals(part_ptr, rows, rm, C, CP, LOG_CP), D, std, DYNAMICS).to(CD)
            lr = lp - tl.load(old_lp_ptr + rows, mask=rm, other=0.0).to(CD)
            # d lr / d mu_j = (x'-mu)_j / (s^2 D)  (cps: 2 (x'-mu)_j / D)
            if DYNAMICS == CPS:
                c1 = 2.0 + var * 0.0
            else:
                c1 = 1.0 / var
            c2 = var * 0.0
        else:
            s1 = row_totals(part_ptr, rows, rm, C, CP, LOG_CP).to(tl.float64) / D
            s2 = row_totals(part_ptr + NP, rows, rm, C, CP, LOG_CP).to(tl.float64) / D
            if DYNAMICS == CPS:
                plain = 2.0 * s1 - s2
                bias = s2
                c_s1 = 2.0 + var * 0.0
            else:
                plain = (s1 - 0.5 * s2) / var
                bias = s2 / (2.0 * var)
                c_s1 = 1.0 / var
            if METHOD == 0:
                lr = plain.to(CD)
                c1 = c_s1
                if DYNAMICS == CPS:
                    c2 = -1.0 + var * 0.0
                else:
                    c2 = -0.5 / var
            elif METHOD == 1:
                lr = (plain + bias).to(CD)
                c1 = c_s1
                c2 = var * 0.0
            else:
                lr = (s1 / std).to(CD)
                c1 = 1.0 / std
                c2 = var * 0.0
            tl.store(stats_ptr + 4 + B + rows, bias.to(CD), mask=rm)
        tl.store(stats_ptr + 4 + rows, lr, mask=rm)
        # clipped surrogate (reference.clipped_surrogate), in the compute dtype like the reference
        lr64 = lr.to(tl.float64)
        adv = tl.load(adv_ptr + rows, mask=rm, other=0.0).to(CD)
        adv = tl.minimum(tl.maximum(adv.to(tl.float64), -adv_max), adv_max).to(CD)
        ratio = tl.exp(lr64).to(CD)
        ratio_c = tl.exp(tl.minimum(tl.maximum(lr64, lo), hi)).to(CD)
        if METHOD == 3:
            w = 1.0 / tl.abs(dt)
            if BETA_DT:
                w = w * beta
        else:
            w = var * 0.0 + 1.0
        w_cd = w.to(CD)
        pa = -adv * ratio
        pc = -adv * ratio_c
        per = tl.maximum(pa, pc, propagate_nan=tl.PropagateNan.ALL) * w_cd
        in_range = (lr64 >= lo) & (lr64 <= hi)
        ga = tl.where(pa > pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
        gb = tl.where(pa < pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
        d_lr = (w_cd.to(tl.float64) / B) * (ga * pa.to(tl.float64) + tl.where(in_range, gb * pc.to(tl.float64), 0.0))
        # grad_v_j = d_lr * (c1 * dS1/dv_j + c2 * dS2/dv_j),  dS1/dv = b u / D,  dS2/dv = 2 b Delta / D
        tl.store(coef_ptr + rows, (d_lr * c1 * b / D).to(CD), mask=rm)
        tl.store(coef_ptr + B + rows, (d_lr * c2 * 2.0 * b / D).to(CD), mask=rm)
        exc = expm1_f64(lr64)
        s_loss += tl.where(rm, per.to(tl.float64), 0.0)
        s_exc += tl.where(rm, exc, 0.0)
        s_exc2 += tl.where(rm, exc * exc, 0.0)
        s_clip += tl.where(rm & ((lr64 > hi) | (lr64 < lo)), 1.0, 0.0)
        s_lr2 += tl.where(rm, lr64 * lr64, 0.0)
    mean_exc = tl.sum(s_exc, axis=0) / B
    var_exc = tl.maximum(tl.sum(s_exc2, axis=0) / B - mean_exc * mean_exc, 0.0)
    tl.store(loss_ptr, (tl.sum(s_loss, axis=0) / B).to(CD))
    tl.store(stats_ptr, (1.0 + mean_exc).to(CD))
    tl.store(stats_ptr + 1, tl.sqrt(var_exc).to(CD))
    tl.store(stats_ptr + 2, (tl.sum(s_clip, axis=0) / B).to(CD))
    tl.store(stats_ptr + 3, (0.5 * tl.sum(s_lr2, axis=0) / B).to(CD))


@triton.jit
def policy_loss_backward_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, coef_ptr, g_loss_ptr, g_v_ptr,
                                sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                                B, D, C, ITERS,
                                DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                                NEED_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """grad_v = (k_u*u + k_d*Delta) * grad_loss, elementwise; grad_loss (0-dim) is read here, not multiplied
    by another launch. NEED_DELTA is False when k_d == 0 (then v is not read for OLD 1, 2)."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    CD: tl.constexpr = coef_ptr.dtype.element_ty
    _, _, a64, b64, _, _ = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row, DYNAMICS,
                                                  PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    g = tl.load(g_loss_ptr).to(CD)
    k_u = tl.load(coef_ptr + row)
    k_d = tl.load(coef_ptr + B + row)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        xp = tl.load(xp_ptr + base + offs, mask=m, other=0.0).to(CD)
        if OLD == 0:
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(CD)
            v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(CD)
            grad = k_u * (xp - transition_mean(x, v, a, b))
        else:
            if OLD == 1:
                mu_old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(CD)
            else:
                x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(CD)
                v_old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(CD)
                mu_old = transition_mean(x, v_old, a, b)
            grad = k_u * (xp - mu_old)
            if NEED_DELTA:
                v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(CD)
                if OLD == 1:
                    x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(CD)
                    delta = transition_mean(x, v, a, b) - mu_old
                else:
                    delta = b * (v - v_old)
                grad += k_d * delta
        tl.store(g_v_ptr + base + offs, rounded_for(grad * g, g_v_ptr), mask=m)
