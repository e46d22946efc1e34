"""Policy-loss kernels (SPEC §4-6): forward = reduce + finish (2 launches), backward = 1 elementwise launch.

OLD (constexpr) says what the rollout left: 0 old_log_prob (grpo only), 1 old_prev_sample_mean,
2 old_model_output. Per sample i, with u = x' - mu_old and Delta = mu_theta - mu_old (OLD 1) or
b*(v - v_old) (OLD 2), the reduce kernel writes chunk partials of sum u*Delta and sum Delta^2 (OLD 1, 2)
or of sum (x' - mu_theta)^2 with exactly sde_step's chunking and helpers (OLD 0). The finish kernel turns
them into log-ratios (closed forms, reference.log_ratios), the clipped surrogate, the stats and, per
sample, the backward coefficients k_u, k_d of  grad_v = (k_u*u + k_d*Delta) * grad_loss  (OLD 0:
u = x' - mu_theta, k_d = 0). METHOD: 0 grpo, 1 mean_revised, 2 ratio_norm, 3 guard, 4 dppo (Flow-DPPO, SPEC §9:
the plain log-ratio, no clipping, a sample dropped when its exact per-step KL K = S2/(2 s^2) >= tau and
A log r > 0; its stats append kl_mean, kl_max, masked_fraction and the masked fractions among A > 0 and A < 0).
"""
import triton
import triton.language as tl

from .common import (CPS, accumulate_sq_dev, chunk_of_program, clamp_nan, expm1_cd, expm1_f64, last_to_arrive,
                     load_sigmas, load_tile, log_prob_from_sum, log_prob_from_total, raise_errors, raise_row_errors, rounded_for,
                     row_step_coefficients, row_total, row_totals, sigma_error_bits, sigma_errors, step_coefficients,
                     transition_mean, tree_sum)


@triton.jit
def accumulate_change(acc1, acc2, x, v, xp, o, a, b, m, OLD: tl.constexpr):
    """One tile's terms of the per-sample sums (masked lanes add 0). OLD 1, 2: acc1 += u*Delta, acc2 += Delta^2
    with u = x' - mu_old, Delta = mu_theta - mu_old (OLD 1, ``o`` = mu_old) or b (v - v_old) (OLD 2, ``o`` = v_old,
    mu_old = a x + b v_old). OLD 0: acc1 += (x' - mu_theta)^2 exactly as sde_step sums it (acc2 unused)."""
    if OLD == 0:
        acc1 = accumulate_sq_dev(acc1, xp, transition_mean(x, v, a, b), m)
    else:
        if OLD == 1:
            mu_old = o
            delta = transition_mean(x, v, a, b) - mu_old
        else:
            mu_old = transition_mean(x, o, a, b)
            delta = b * (v - o)
        u = xp - mu_old
        acc1 += tl.where(m, u * delta, 0.0)
        acc2 += tl.where(m, delta * delta, 0.0)
    return acc1, acc2


@triton.jit
def policy_loss_reduce_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, part_ptr,
                              sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                              D, C, ITERS, NP, sv, sx, sxp, so,
                              DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                              BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """part[p] = chunk sum of u*Delta (OLD 1, 2) or (x'-mu)^2 (OLD 0); part[NP + p] = chunk sum of Delta^2."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bo = r64 * sv, r64 * sx, r64 * sxp, r64 * so
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
        x, v, xp, o = load_tile(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, CD, OLD != 0)
        acc1, acc2 = accumulate_change(acc1, acc2, x, v, xp, o, a, b, m, OLD)
    tl.store(part_ptr + pid, tree_sum(acc1, LOG_BLOCK))
    if OLD != 0:
        tl.store(part_ptr + NP + pid, tree_sum(acc2, LOG_BLOCK))


@triton.jit
def policy_loss_finish_kernel(part_ptr, adv_ptr, old_lp_ptr, coef_ptr, loss_ptr, stats_ptr, err_ptr,
                              sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                              lo: tl.float64, hi: tl.float64, adv_max: tl.float64, tau: tl.float64,
                              B, C, D, NP,
                              DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                              METHOD: tl.constexpr, BETA_DT: tl.constexpr, CHECK: tl.constexpr,
                              ERR_BASE: tl.constexpr, RB: tl.constexpr, CP: tl.constexpr, LOG_CP: tl.constexpr):
    """One program over all samples, RB rows at a time. CHECK: per-sample values checked as in
    policy_loss_fwd_kernel (a row that fails gets NaN outputs and sets its error bits). Per row
    (reference.log_ratios / clipped_surrogate):
    log-ratio, ratio = exp, clip on the log-ratio against [lo, hi], per-sample loss w*max(-A r, -A r_clip),
    dL/dlog_ratio mirroring autograd's max/clamp rule (ties split 1/2), and k_u, k_d -> coef[0:B], coef[B:2B].
    stats = [ratio_mean, ratio_std, clipfrac, approx_kl, log_ratio (B), bias (B)], ratio stats from
    expm1(log_ratio) (reference.summarize); loss = mean_i per-sample loss. METHOD 4 (dppo): the masked surrogate
    (reference.masked_surrogate) and stats[4 + 2B:] = kl_mean, kl_max, masked_fraction, masked fraction among
    A > 0, among A < 0 (reference.kl_stats)."""
    CD: tl.constexpr = loss_ptr.dtype.element_ty
    lo = lo + tl.zeros([], tl.float64)  # exact float64 in both modes (see common.load_sigmas)
    hi = hi + tl.zeros([], tl.float64)
    adv_max = adv_max + tl.zeros([], tl.float64)
    tau = tau + tl.zeros([], tl.float64)
    s_kl = tl.zeros([RB], tl.float64)
    m_kl = tl.full([RB], float("-inf"), tl.float64)
    s_pos = tl.zeros([RB], tl.float64)
    s_neg = tl.zeros([RB], tl.float64)
    s_dpos = tl.zeros([RB], tl.float64)
    s_dneg = tl.zeros([RB], tl.float64)
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
            tl.store(stats_ptr + 4 + B + rows, tl.zeros([RB], CD), mask=rm)  # no bias without an old mean
            # d lr / d mu_j = (x'-mu)_j / (s^2 D)  (cps: 2 (x'-mu)_j / D)
            if DYNAMICS == CPS:
                c1 = 2.0 + var * 0.0
            else:
                c1 = 1.0 / var
            c2 = var * 0.0
            kl = (var * 0.0).to(CD)  # (dppo needs an old mean: not reached)
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
            kl = (s2 / (2.0 * var)).to(CD)  # dppo's exact per-step KL (reference.step_kl)
            if METHOD == 0 or METHOD == 4:
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
        adv = tl.load(adv_ptr + rows, mask=rm, other=0.0).to(tl.float64)
        if CHECK:  # errors.py: +0 sigma, +1 sigma_next, +2 cps std at sigma_next == 0, +3 advantages, +4 old_log_prob
            bad = tl.where(tl.abs(adv) < float("inf"), 0, 1 << (ERR_BASE + 3))
            if PER_SAMPLE:
                bad = bad | sigma_error_bits(sig, nxt, ERR_BASE)
                if DYNAMICS == CPS and METHOD >= 2:
                    bad = bad | tl.where(nxt == 0.0, 1 << (ERR_BASE + 2), 0)
            if OLD == 0:
                old_lp = tl.load(old_lp_ptr + rows, mask=rm, other=0.0)
                bad = bad | tl.where(tl.abs(old_lp) < float("inf"), 0, 1 << (ERR_BASE + 4))
            raise_row_errors(err_ptr, bad, rm)
            lr = tl.where(bad != 0, float("nan"), lr)  # NaN loss, log-ratio, stats and gradient for these samples
        tl.store(stats_ptr + 4 + rows, lr, mask=rm)
        # clipped surrogate (reference.clipped_surrogate), in the compute dtype like the reference
        lr64 = lr.to(tl.float64)
        adv = clamp_nan(adv, -adv_max, adv_max).to(CD)
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
        if METHOD == 4:  # masked surrogate: a detached gate on the exact KL and the direction of the move
            drop = (kl >= tau.to(CD)) & (adv * lr > 0)
            per = tl.where(drop, 0.0, pa).to(CD)
            d_lr = tl.where(drop, 0.0, pa.to(tl.float64)) / B
            out = drop
            pos = tl.load(adv_ptr + rows, mask=rm, other=0.0) > 0
            neg = tl.load(adv_ptr + rows, mask=rm, other=0.0) < 0
            s_kl += tl.where(rm, kl.to(tl.float64), 0.0)
            m_kl = tl.maximum(m_kl, tl.where(rm, kl.to(tl.float64), float("-inf")))
            s_pos += tl.where(rm & pos, 1.0, 0.0)
            s_neg += tl.where(rm & neg, 1.0, 0.0)
            s_dpos += tl.where(rm & pos & drop, 1.0, 0.0)
            s_dneg += tl.where(rm & neg & drop, 1.0, 0.0)
        else:
            pc = -adv * ratio_c
            per = tl.maximum(pa, pc, propagate_nan=tl.PropagateNan.ALL) * w_cd
            in_range = (lr64 >= lo) & (lr64 <= hi)
            ga = tl.where(pa > pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
            gb = tl.where(pa < pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
            d_lr = (w_cd.to(tl.float64) / B) * (ga * pa.to(tl.float64)
                                                + tl.where(in_range, gb * pc.to(tl.float64), 0.0))
            out = (lr64 > hi) | (lr64 < lo)
        # grad_v_j = d_lr * (c1 * dS1/dv_j + c2 * dS2/dv_j),  dS1/dv = b u / D,  dS2/dv = 2 b Delta / D
        tl.store(coef_ptr + rows, (d_lr * c1 * b / D).to(CD), mask=rm)
        tl.store(coef_ptr + B + rows, (d_lr * c2 * 2.0 * b / D).to(CD), mask=rm)
        exc = expm1_f64(lr64)
        s_loss += tl.where(rm, per.to(tl.float64), 0.0)
        s_exc += tl.where(rm, exc, 0.0)
        s_exc2 += tl.where(rm, exc * exc, 0.0)
        s_clip += tl.where(rm & out, 1.0, 0.0)
        s_lr2 += tl.where(rm, lr64 * lr64, 0.0)
    mean_exc = tl.sum(s_exc, axis=0) / B
    var_exc = tl.maximum(tl.sum(s_exc2, axis=0) / B - mean_exc * mean_exc, 0.0)
    tl.store(loss_ptr, (tl.sum(s_loss, axis=0) / B).to(CD))
    tl.store(stats_ptr, (1.0 + mean_exc).to(CD))
    tl.store(stats_ptr + 1, tl.sqrt(var_exc).to(CD))
    tl.store(stats_ptr + 2, (tl.sum(s_clip, axis=0) / B).to(CD))
    tl.store(stats_ptr + 3, (0.5 * tl.sum(s_lr2, axis=0) / B).to(CD))
    if METHOD == 4:
        tl.store(stats_ptr + 4 + 2 * B, (tl.sum(s_kl, axis=0) / B).to(CD))
        tl.store(stats_ptr + 5 + 2 * B, tl.max(m_kl, axis=0).to(CD))
        tl.store(stats_ptr + 6 + 2 * B, (tl.sum(s_clip, axis=0) / B).to(CD))
        tl.store(stats_ptr + 7 + 2 * B, (tl.sum(s_dpos, axis=0) / tl.maximum(tl.sum(s_pos, axis=0), 1.0)).to(CD))
        tl.store(stats_ptr + 8 + 2 * B, (tl.sum(s_dneg, axis=0) / tl.maximum(tl.sum(s_neg, axis=0), 1.0)).to(CD))


@triton.jit
def velocity_grad(v_row, x_row, xp_row, old_row, offs, m, a, b, k_u, k_d, CD: tl.constexpr, OLD: tl.constexpr,
                  NEED_DELTA: tl.constexpr):
    """d loss / d v of one tile of a sample (pointers at the sample's start): k_u*u + k_d*Delta, u = x' - mu_old,
    Delta = mu_theta - mu_old (OLD 1) or b (v - v_old) (OLD 2); OLD 0: u = x' - mu_theta. NEED_DELTA False when
    k_d == 0 (v is then not read for OLD 1, 2)."""
    xp = tl.load(xp_row + offs, mask=m, other=0.0).to(CD)
    if OLD == 0:
        x = tl.load(x_row + offs, mask=m, other=0.0).to(CD)
        v = tl.load(v_row + offs, mask=m, other=0.0).to(CD)
        grad = k_u * (xp - transition_mean(x, v, a, b))
    else:
        if OLD == 1:
            mu_old = tl.load(old_row + offs, mask=m, other=0.0).to(CD)
        else:
            x = tl.load(x_row + offs, mask=m, other=0.0).to(CD)
            v_old = tl.load(old_row + offs, mask=m, other=0.0).to(CD)
            mu_old = transition_mean(x, v_old, a, b)
        grad = k_u * (xp - mu_old)
        if NEED_DELTA:
            v = tl.load(v_row + offs, mask=m, other=0.0).to(CD)
            if OLD == 1:
                x = tl.load(x_row + offs, mask=m, other=0.0).to(CD)
                delta = transition_mean(x, v, a, b) - mu_old
            else:
                delta = b * (v - v_old)
            grad += k_d * delta
    return grad


@triton.jit
def policy_loss_backward_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, coef_ptr, g_loss_ptr, g_v_ptr,
                                sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                                B, D, C, ITERS, sv, sx, sxp, so,
                                DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                                NEED_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """grad_v = (k_u*u + k_d*Delta) * grad_loss, elementwise; grad_loss (0-dim) is read here, not multiplied
    by another launch. NEED_DELTA is False when k_d == 0 (then v is not read for OLD 1, 2)."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bo = r64 * sv, r64 * sx, r64 * sxp, r64 * so
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
        grad = velocity_grad(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, a, b, k_u, k_d, CD, OLD,
                             NEED_DELTA)
        tl.store(g_v_ptr + base + offs, rounded_for(grad * g, g_v_ptr), mask=m)


# ---- single launch forward (fused finish) ------------------------------------------------------------------
# Row buffer ``row`` (compute dtype, 8B): [0:B] k_u, [B:2B] k_d, [2B:3B] a, [3B:4B] b (the backward's per-row
# constants), [4B:5B] per-sample loss, [5B:6B] r - 1, [6B:7B] clipped (dppo: masked), [7B:8B] dppo's KL (the batch
# finish's inputs).

@triton.jit
def policy_loss_fwd_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, adv_ptr, old_lp_ptr, part_ptr, row_ptr, cnt_ptr, err_ptr,
                           loss_ptr, stats_ptr,
                           sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                           lo: tl.float64, hi: tl.float64, adv_max: tl.float64, tau: tl.float64,
                           B, D, C, NP, sv, sx, sxp, so,
                           DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr,
                           METHOD: tl.constexpr, BETA_DT: tl.constexpr, CHECK: tl.constexpr, ERR_BASE: tl.constexpr,
                           BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, ITERS: tl.constexpr,
                           CP: tl.constexpr, LOG_CP: tl.constexpr, RB: tl.constexpr, LOG_RB: tl.constexpr,
                           LEAN: tl.constexpr = False, ONE_TILE: tl.constexpr = False):
    """The whole forward in one launch. Program p reduces chunk p % C of row p // C (as policy_loss_reduce_kernel
    does: partials of sum u*Delta, sum Delta^2, or sum (x'-mu)^2 for OLD 0), then takes a ticket on its row's
    counter; the last program of a row sums the row's C partials in a fixed order and finishes the row
    (:func:`_finish_row`); the last row to finish takes a ticket on the batch counter and finishes the batch
    (:func:`_finish_batch`). Sums never depend on which program arrives last, so results are bitwise
    reproducible. cnt (int32, B + 1) must be zero at launch and is zero again after it. CHECK: per-sample
    values are checked in the row's finish (errors.py bits from ERR_BASE: tensor sigmas, the cps std,
    advantages, old_log_prob); a row that fails gets a NaN loss, log-ratio and gradient and sets its bits.
    LEAN (opt-in, triton_launch.LEAN): the float64 coefficients before the first loads (fewer live registers, so
    the launch's register cap holds without spills); the same values. With CHECK, a row whose sigmas fail gets NaN
    coefficients (common.row_step_coefficients), as on the torch backend. ONE_TILE (B <= RB; the launch sets it with
    LEAN only): the batch finish reads the row buffer once (:func:`_finish_batch`)."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bo = r64 * sv, r64 * sx, r64 * sxp, r64 * so
    CD: tl.constexpr = part_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    offs = start + lanes
    m = offs < D
    if LEAN:
        std_dev_t, std, a64, b64, beta, dt = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row,
                                                                   DYNAMICS, PER_SAMPLE, CHECK and PER_SAMPLE,
                                                                   DYNAMICS == CPS and METHOD >= 2)
        x, v, xp, o = load_tile(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, CD, OLD != 0)
    else:  # the first tile's loads go out before the float64 coefficient math, which then overlaps them
        x, v, xp, o = load_tile(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, CD, OLD != 0)
        std_dev_t, std, a64, b64, beta, dt = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row,
                                                                   DYNAMICS, PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    acc1 = tl.zeros([BLOCK], CD)
    acc2 = tl.zeros([BLOCK], CD)
    for it in tl.static_range(ITERS):
        if it > 0:
            offs = start + it * BLOCK + lanes
            m = offs < D
            x, v, xp, o = load_tile(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, CD, OLD != 0)
        acc1, acc2 = accumulate_change(acc1, acc2, x, v, xp, o, a, b, m, OLD)
    tl.store(part_ptr + pid, tree_sum(acc1, LOG_BLOCK))
    if OLD != 0:
        tl.store(part_ptr + NP + pid, tree_sum(acc2, LOG_BLOCK))
    if last_to_arrive(cnt_ptr + row, C):
        tl.store(cnt_ptr + row, 0)
        _finish_row(part_ptr, adv_ptr, old_lp_ptr, row_ptr, stats_ptr, err_ptr, sig_ptr, nxt_ptr, row, std, b64, beta,
                    dt, a, b, lo, hi, adv_max, tau, B, D, C, NP, DYNAMICS, PER_SAMPLE, OLD, METHOD, BETA_DT, CHECK,
                    ERR_BASE, CP, LOG_CP)
        if last_to_arrive(cnt_ptr + B, B):
            tl.store(cnt_ptr + B, 0)
            _finish_batch(row_ptr, stats_ptr, loss_ptr, adv_ptr, B, METHOD, RB, LOG_RB, ONE_TILE)


@triton.jit
def _finish_row(part_ptr, adv_ptr, old_lp_ptr, row_ptr, stats_ptr, err_ptr, sig_ptr, nxt_ptr, row, std64, b64,
                beta64, dt64, a, b, lo, hi, adv_max, tau, B, D, C, NP,
                DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, OLD: tl.constexpr, METHOD: tl.constexpr,
                BETA_DT: tl.constexpr, CHECK: tl.constexpr, ERR_BASE: tl.constexpr,
                CP: tl.constexpr, LOG_CP: tl.constexpr):
    """One row, in the compute dtype CD as reference.log_ratios / clipped_surrogate compute it; float64 only
    for the clip decision (the log-ratio against log(1 +- eps)) and the weight (reference.sample_weights).
    Writes log_ratio (stats[4 + row]), bias (stats[4 + B + row]) and the row buffer (k_u, k_d, a, b, loss, r - 1,
    clipped, KL). grad_v = (k_u*u + k_d*Delta) * grad_loss; k_u, k_d follow autograd's max/clamp rule (ties 1/2).
    METHOD 4 (dppo): K = S2/(2 s^2) and the mask (K >= tau and A log r > 0) in CD, as reference.masked_surrogate."""
    CD: tl.constexpr = a.dtype
    s = std64.to(CD)
    var = s * s
    lo = lo + tl.zeros([], tl.float64)  # exact float64 in both modes (see common.load_sigmas)
    hi = hi + tl.zeros([], tl.float64)
    adv_max = adv_max + tl.zeros([], tl.float64)
    tau = tau + tl.zeros([], tl.float64)
    if OLD == 0:
        lp = log_prob_from_sum(row_total(part_ptr, row, C, CP, LOG_CP), D, s, DYNAMICS)
        old_lp = tl.load(old_lp_ptr + row).to(CD)
        lr = lp - old_lp
        tl.store(stats_ptr + 4 + B + row, tl.full([], 0.0, CD))  # no bias without an old mean (defined bits)
        # d lr / d mu_j = (x'-mu)_j / (s^2 D)  (cps: 2 (x'-mu)_j / D)
        if DYNAMICS == CPS:
            c1 = 2.0 + var * 0.0
        else:
            c1 = 1.0 / var
        c2 = var * 0.0
        kl = var * 0.0  # no old mean: dppo is refused; the row buffer still gets defined bits
    else:
        s1 = row_total(part_ptr, row, C, CP, LOG_CP) / D
        s2 = row_total(part_ptr + NP, row, C, CP, LOG_CP) / D
        if DYNAMICS == CPS:
            plain = 2.0 * s1 - s2
            bias = s2
            c_s1 = 2.0 + var * 0.0
            c_s2 = -1.0 + var * 0.0
        else:
            plain = (s1 - 0.5 * s2) / var
            bias = s2 / (2.0 * var)
            c_s1 = 1.0 / var
            c_s2 = -0.5 / var
        kl = s2 / (2.0 * var)  # dppo's exact per-step KL (reference.step_kl)
        if METHOD == 0 or METHOD == 4:
            lr = plain
            c1 = c_s1
            c2 = c_s2
        elif METHOD == 1:
            lr = plain + bias
            c1 = c_s1
            c2 = var * 0.0
        else:
            lr = s1 / s
            c1 = 1.0 / s
            c2 = var * 0.0
        tl.store(stats_ptr + 4 + B + row, bias)
    adv_raw = tl.load(adv_ptr + row).to(tl.float64)
    if CHECK:  # errors.py: +0 sigma, +1 sigma_next, +2 cps std at sigma_next == 0, +3 advantages, +4 old_log_prob
        bad = tl.where(tl.abs(adv_raw) < float("inf"), 0, 1 << (ERR_BASE + 3))
        if PER_SAMPLE:
            bad = bad | sigma_errors(sig_ptr, nxt_ptr, row, ERR_BASE)
            if DYNAMICS == CPS and METHOD >= 2:
                bad = bad | tl.where(tl.load(nxt_ptr + row) == 0.0, 1 << (ERR_BASE + 2), 0)
        if OLD == 0:
            bad = bad | tl.where(tl.abs(old_lp) < float("inf"), 0, 1 << (ERR_BASE + 4))
        if raise_errors(err_ptr, bad):
            lr = lr + float("nan")  # NaN loss, log-ratio, stats and gradient for this sample
    tl.store(stats_ptr + 4 + row, lr)
    # clipped surrogate; the clip decision in float64 (exact: lr is a CD number, lo/hi float64 log(1 +- eps))
    lr64 = lr.to(tl.float64)
    adv = clamp_nan(adv_raw, -adv_max, adv_max).to(CD)
    ratio = tl.exp(lr)
    ratio_c = tl.exp(tl.minimum(tl.maximum(lr64, lo), hi).to(CD))
    if METHOD == 3:
        w64 = 1.0 / tl.abs(dt64)
        if BETA_DT:
            w64 = w64 * beta64
        w = w64.to(CD)
    else:
        w = var * 0.0 + 1.0
    pa = -adv * ratio
    if METHOD == 4:  # masked surrogate: a detached gate on the exact KL and the direction of the move
        drop = (kl >= tau.to(CD)) & (adv * lr > 0)
        per = tl.where(drop, 0.0, pa).to(CD)
        d_lr = (tl.where(drop, 0.0, pa) / B).to(CD)
        out = drop
    else:
        pc = -adv * ratio_c
        per = tl.maximum(pa, pc, propagate_nan=tl.PropagateNan.ALL) * w
        in_range = (lr64 >= lo) & (lr64 <= hi)
        ga = tl.where(pa > pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
        gb = tl.where(pa < pc, 1.0, tl.where(pa == pc, 0.5, 0.0))
        d_lr = (w / B) * (ga * pa + tl.where(in_range, gb * pc, 0.0))
        out = (lr64 > hi) | (lr64 < lo)
    # grad_v_j = d_lr * (c1 * dS1/dv_j + c2 * dS2/dv_j),  dS1/dv = b u / D,  dS2/dv = 2 b Delta / D
    tl.store(row_ptr + row, d_lr * c1 * b / D)
    tl.store(row_ptr + B + row, d_lr * c2 * 2.0 * b / D)
    tl.store(row_ptr + 2 * B + row, a)
    tl.store(row_ptr + 3 * B + row, b)
    tl.store(row_ptr + 4 * B + row, per)
    tl.store(row_ptr + 5 * B + row, expm1_cd(lr))
    tl.store(row_ptr + 6 * B + row, tl.where(out, 1.0, 0.0).to(CD))
    tl.store(row_ptr + 7 * B + row, kl)  # every method: the whole row buffer has defined bits (opcheck, graphs)


@triton.jit
def _batch_tile(row_ptr, stats_ptr, adv_ptr, B, rows, rm, METHOD: tl.constexpr):
    """One tile of rows of the batch finish, loaded from the row buffer and stats (written by other programs: .cg):
    (per-sample loss, r - 1, clipped, lr^2, dppo's KL, its max candidates, A > 0, A < 0, dropped among A > 0,
    among A < 0), 0 (-inf for the max) outside ``rm``."""
    CD: tl.constexpr = row_ptr.dtype.element_ty
    loss = tl.load(row_ptr + 4 * B + rows, mask=rm, other=0.0, cache_modifier=".cg")
    exc = tl.load(row_ptr + 5 * B + rows, mask=rm, other=0.0, cache_modifier=".cg")
    clipped = tl.load(row_ptr + 6 * B + rows, mask=rm, other=0.0, cache_modifier=".cg")
    lr = tl.load(stats_ptr + 4 + rows, mask=rm, other=0.0, cache_modifier=".cg")
    kl = tl.zeros_like(loss)
    kl_max = tl.full(loss.shape, float("-inf"), CD)
    pos = tl.zeros_like(loss)
    neg = tl.zeros_like(loss)
    if METHOD == 4:
        kl = tl.load(row_ptr + 7 * B + rows, mask=rm, other=0.0, cache_modifier=".cg")
        kl_max = tl.where(rm, kl, float("-inf"))
        adv = tl.load(adv_ptr + rows, mask=rm, other=0.0)
        pos = tl.where(adv > 0, 1.0, 0.0).to(CD)
        neg = tl.where(adv < 0, 1.0, 0.0).to(CD)
    return loss, exc, clipped, lr * lr, kl, kl_max, pos, neg, clipped * pos, clipped * neg


@triton.jit
def _finish_batch(row_ptr, stats_ptr, loss_ptr, adv_ptr, B, METHOD: tl.constexpr, RB: tl.constexpr,
                  LOG_RB: tl.constexpr, ONE_TILE: tl.constexpr = False):
    """loss = mean_i per-sample loss; stats[0:4] = ratio mean, population std (two passes over r - 1, as
    reference.summarize), clip fraction, approx KL = mean(lr^2)/2; METHOD 4 (dppo): stats[4 + 2B:] = kl_mean,
    kl_max, masked_fraction, masked fraction among A > 0, among A < 0 (reference.kl_stats). Rows RB at a time,
    fixed-order sums. ONE_TILE (B <= RB; the lean kernels): the second pass over r - 1 reuses the values the first
    loaded (one dependent round trip to memory fewer; the same sums)."""
    CD: tl.constexpr = loss_ptr.dtype.element_ty
    s_loss = tl.zeros([RB], CD)
    s_exc = tl.zeros([RB], CD)
    s_clip = tl.zeros([RB], CD)
    s_lr2 = tl.zeros([RB], CD)
    s_kl = tl.zeros([RB], CD)
    m_kl = tl.full([RB], float("-inf"), CD)
    s_pos = tl.zeros([RB], CD)
    s_neg = tl.zeros([RB], CD)
    s_dpos = tl.zeros([RB], CD)
    s_dneg = tl.zeros([RB], CD)
    kept_exc = tl.zeros([RB], CD)  # ONE_TILE: the (only) tile's r - 1, for the second pass
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        t_loss, t_exc, t_clip, t_lr2, t_kl, t_max, t_pos, t_neg, t_dpos, t_dneg = _batch_tile(
            row_ptr, stats_ptr, adv_ptr, B, rows, rows < B, METHOD)
        s_loss += t_loss
        s_exc += t_exc
        s_clip += t_clip
        s_lr2 += t_lr2
        s_kl += t_kl
        m_kl = tl.maximum(m_kl, t_max)
        s_pos += t_pos
        s_neg += t_neg
        s_dpos += t_dpos
        s_dneg += t_dneg
        kept_exc = t_exc
    mean_exc = tree_sum(s_exc, LOG_RB) / B
    s_dev = tl.zeros([RB], CD)
    if ONE_TILE:  # no second read: the values the first pass loaded (the same operations, so the same bits)
        rm = tl.arange(0, RB) < B
        dev = kept_exc - mean_exc
        s_dev += tl.where(rm, dev * dev, 0.0)
    else:
        for r0 in range(0, B, RB):
            rows = r0 + tl.arange(0, RB)
            rm = rows < B
            dev = tl.load(row_ptr + 5 * B + rows, mask=rm, other=0.0, cache_modifier=".cg") - mean_exc
            s_dev += tl.where(rm, dev * dev, 0.0)
    tl.store(loss_ptr, tree_sum(s_loss, LOG_RB) / B)
    tl.store(stats_ptr, 1.0 + mean_exc)
    var_exc = tree_sum(s_dev, LOG_RB) / B
    if CD == tl.float64:
        std_exc = tl.sqrt(var_exc)
    else:
        std_exc = tl.sqrt_rn(var_exc)  # tl.sqrt is approximate in float32
    tl.store(stats_ptr + 1, std_exc)
    tl.store(stats_ptr + 2, tree_sum(s_clip, LOG_RB) / B)
    tl.store(stats_ptr + 3, 0.5 * (tree_sum(s_lr2, LOG_RB) / B))
    if METHOD == 4:
        tl.store(stats_ptr + 4 + 2 * B, tree_sum(s_kl, LOG_RB) / B)
        tl.store(stats_ptr + 5 + 2 * B, tl.max(m_kl, axis=0))
        tl.store(stats_ptr + 6 + 2 * B, tree_sum(s_clip, LOG_RB) / B)
        tl.store(stats_ptr + 7 + 2 * B, tree_sum(s_dpos, LOG_RB) / tl.maximum(tree_sum(s_pos, LOG_RB), 1.0))
        tl.store(stats_ptr + 8 + 2 * B, tree_sum(s_dneg, LOG_RB) / tl.maximum(tree_sum(s_neg, LOG_RB), 1.0))


@triton.jit
def policy_loss_bwd_kernel(v_ptr, x_ptr, xp_ptr, old_ptr, row_ptr, g_loss_ptr, g_v_ptr,
                           B, D, C, sv, sx, sxp, so,
                           OLD: tl.constexpr, NEED_DELTA: tl.constexpr,
                           BLOCK: tl.constexpr, ITERS: tl.constexpr, LEAN: tl.constexpr = False):
    """grad_v = (k_u*u + k_d*Delta) * grad_loss, elementwise, with the per-row constants (k_u, k_d, a, b) the
    forward left in the row buffer (no float64 here); grad_loss (0-dim) is read here, not multiplied by another
    launch. NEED_DELTA is False when k_d == 0 (then v is not read for OLD 1, 2). LEAN: the hardware bf16 rounding."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bo = r64 * sv, r64 * sx, r64 * sxp, r64 * so
    CD: tl.constexpr = row_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    k_u = tl.load(row_ptr + row)
    k_d = tl.load(row_ptr + B + row)
    a = tl.load(row_ptr + 2 * B + row)
    b = tl.load(row_ptr + 3 * B + row)
    g = tl.load(g_loss_ptr).to(CD)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        m = offs < D
        grad = velocity_grad(v_ptr + bv, x_ptr + bx, xp_ptr + bxp, old_ptr + bo, offs, m, a, b, k_u, k_d, CD, OLD,
                             NEED_DELTA)
        tl.store(g_v_ptr + base + offs, rounded_for(grad * g, g_v_ptr, LEAN), mask=m)
