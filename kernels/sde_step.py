"""SDE step kernels (SPEC §2): forward = reduce + finish (2 launches), backward = 1 elementwise launch.

Layout: latents are flat (B, D) row-major; program p of the reduce/backward grids handles row p // C,
elements [(p % C)*BLOCK*ITERS, ...+BLOCK*ITERS) of it. Per-sample coefficients are recomputed in float64
from sigma in every program (``common.step_coefficients``); CD, the compute dtype, is the element type of
the mean pointer (float32, or float64 for float64 inputs).
"""
import triton
import triton.language as tl

from .common import (CPS, accumulate_sq_dev, add_rn, chunk_of_program, last_to_arrive, load_sigmas, load_tile,
                     log_prob_from_sum, log_prob_from_total, mul_rn, raise_errors, raise_row_errors, rounded_for,
                     row_step_coefficients, row_total, row_totals, sigma_error_bits, sigma_errors, step_coefficients,
                     transition_mean, tree_sum)


@triton.jit
def sde_step_reduce_kernel(v_ptr, x_ptr, xp_ptr, z_ptr, xp_out_ptr, mean_ptr, part_ptr,
                           sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                           D, C, ITERS, sv, sx, sxp, sz,
                           DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, ROLLOUT: tl.constexpr,
                           BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """mu = a*x + b*v -> mean (B, D); rollout: x' = round(mu + s*z) -> xp_out; part[p] = sum (x'-mu)^2 over
    this program's chunk (x' as stored), accumulated elementwise then summed by a fixed tree."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bz = r64 * sv, r64 * sx, r64 * sxp, r64 * sz
    CD: tl.constexpr = mean_ptr.dtype.element_ty
    _, std, a64, b64, _, _ = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row, DYNAMICS,
                                                  PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    s = std.to(CD)
    acc = tl.zeros([BLOCK], CD)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + bx + offs, mask=m, other=0.0).to(CD)
        v = tl.load(v_ptr + bv + offs, mask=m, other=0.0).to(CD)
        mu = transition_mean(x, v, a, b)
        tl.store(mean_ptr + base + offs, mu, mask=m)
        if ROLLOUT:
            z = tl.load(z_ptr + bz + offs, mask=m, other=0.0).to(CD)
            stored = rounded_for(add_rn(mu, mul_rn(s, z)), xp_out_ptr)
            tl.store(xp_out_ptr + base + offs, stored, mask=m)
            xp = stored.to(CD)
        else:
            xp = tl.load(xp_ptr + bxp + offs, mask=m, other=0.0).to(CD)
        acc = accumulate_sq_dev(acc, xp, mu, m)
    tl.store(part_ptr + pid, tree_sum(acc, LOG_BLOCK))


@triton.jit
def sde_step_finish_kernel(part_ptr, log_prob_ptr, std_dev_t_ptr, err_ptr,
                           sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                           B, C, D,
                           DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, CHECK: tl.constexpr,
                           ERR_BASE: tl.constexpr, RB: tl.constexpr, CP: tl.constexpr, LOG_CP: tl.constexpr):
    """One program: log_prob[i] = log_prob_from_total(sum_c part[i, c]) and std_dev_t[i], RB rows at a time.
    CHECK (tensor sigmas): rows whose sigmas break SPEC §2's bounds get a NaN log-prob and set their bits (from
    ERR_BASE) in the error word (grpo_guard/ops/errors.py)."""
    CD: tl.constexpr = log_prob_ptr.dtype.element_ty
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        rm = rows < B
        total = row_totals(part_ptr, rows, rm, C, CP, LOG_CP)
        sig, nxt = load_sigmas(sig_ptr, nxt_ptr, sigma, sigma_next, rows, rm, PER_SAMPLE)
        std_dev_t, std, _, _, _, _ = step_coefficients(sig, nxt, eta, DYNAMICS)
        lp = log_prob_from_total(total, D, std, DYNAMICS).to(CD)
        if CHECK:
            bad = sigma_error_bits(sig, nxt, ERR_BASE)
            raise_row_errors(err_ptr, bad, rm)
            lp = tl.where(bad != 0, float("nan"), lp)
        tl.store(log_prob_ptr + rows, lp, mask=rm)
        tl.store(std_dev_t_ptr + rows, std_dev_t.to(CD), mask=rm)


@triton.jit
def mean_grad(g_prev_row, g_mean_row, xp_row, mean_row, x_row, v_row, offs, m, a, b, k, CD: tl.constexpr,
              HAS_G_PREV: tl.constexpr, HAS_G_MEAN: tl.constexpr, HAS_G_LP: tl.constexpr, HAS_MEAN: tl.constexpr,
              BLOCK: tl.constexpr):
    """g_mu of one tile of a sample (pointers at the sample's start): g_prev + g_mean + k (x' - mu), mu read from
    the saved mean (HAS_MEAN) or recomputed from x and v bit for bit; k = g_lp / (s^2 D) (cps: 2 g_lp / D)."""
    g = tl.zeros([BLOCK], CD)
    if HAS_G_PREV:
        g += tl.load(g_prev_row + offs, mask=m, other=0.0).to(CD)
    if HAS_G_MEAN:
        g += tl.load(g_mean_row + offs, mask=m, other=0.0).to(CD)
    if HAS_G_LP:
        xp = tl.load(xp_row + offs, mask=m, other=0.0).to(CD)
        if HAS_MEAN:
            mu = tl.load(mean_row + offs, mask=m, other=0.0)
        else:
            mu = transition_mean(tl.load(x_row + offs, mask=m, other=0.0).to(CD),
                                 tl.load(v_row + offs, mask=m, other=0.0).to(CD), a, b)
        g += k * (xp - mu)
    return g


@triton.jit
def store_input_grads(g_v_row, g_x_row, offs, m, a, b, g, NEED_G_V: tl.constexpr, NEED_G_X: tl.constexpr,
                      NATIVE: tl.constexpr = False):
    """grad v = b g_mu, grad x = a g_mu, rounded to their dtypes like torch."""
    if NEED_G_V:
        tl.store(g_v_row + offs, rounded_for(b * g, g_v_row, NATIVE), mask=m)
    if NEED_G_X:
        tl.store(g_x_row + offs, rounded_for(a * g, g_x_row, NATIVE), mask=m)


@triton.jit
def sde_step_backward_kernel(xp_ptr, mean_ptr, g_prev_ptr, g_mean_ptr, g_lp_ptr, g_v_ptr, g_x_ptr,
                             sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                             D, C, ITERS, sxp, s_glp,
                             DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_G_PREV: tl.constexpr,
                             HAS_G_MEAN: tl.constexpr, HAS_G_LP: tl.constexpr, NEED_G_V: tl.constexpr,
                             NEED_G_X: tl.constexpr, BLOCK: tl.constexpr):
    """g_mu = g_prev + g_mean + g_lp_i * k_i * (x' - mu), k = 1/(s^2 D) (flow, dance) or 2/D (cps);
    g_v = b*g_mu, g_x = a*g_mu (x' is a constant of log_prob)."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bxp = r64 * sxp
    CD: tl.constexpr = mean_ptr.dtype.element_ty
    _, std, a64, b64, _, _ = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row, DYNAMICS,
                                                  PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    k = a  # read by mean_grad only when HAS_G_LP
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + row * s_glp).to(tl.float64)
        if DYNAMICS == CPS:
            k = (g_lp * 2.0 / D).to(CD)
        else:
            k = (g_lp / (std * std * D)).to(CD)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        g = mean_grad(g_prev_ptr + base, g_mean_ptr + base, xp_ptr + bxp, mean_ptr + base, mean_ptr, mean_ptr, offs,
                      m, a, b, k, CD, HAS_G_PREV, HAS_G_MEAN, HAS_G_LP, True, BLOCK)
        store_input_grads(g_v_ptr + base, g_x_ptr + base, offs, m, a, b, g, NEED_G_V, NEED_G_X)


# ---- single launch forward (fused finish) ------------------------------------------------------------------
# Row buffer ``row`` (compute dtype, 3B): [0:B] a, [B:2B] b, [2B:3B] k = 1/(s^2 D) (cps: 2/D), the backward's
# per-row constants.

@triton.jit
def sde_step_fwd_kernel(v_ptr, x_ptr, xp_ptr, z_ptr, xp_out_ptr, mean_ptr, part_ptr, row_ptr, cnt_ptr, err_ptr,
                        log_prob_ptr, std_dev_t_ptr,
                        sig_ptr, nxt_ptr, sigma: tl.float64, sigma_next: tl.float64, eta: tl.float64,
                        B, D, C, sv, sx, sxp, sz,
                        DYNAMICS: tl.constexpr, PER_SAMPLE: tl.constexpr, ROLLOUT: tl.constexpr,
                        WRITE_MEAN: tl.constexpr, CHECK: tl.constexpr, ERR_BASE: tl.constexpr,
                        BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                        ITERS: tl.constexpr, CP: tl.constexpr, LOG_CP: tl.constexpr, LEAN: tl.constexpr = False):
    """The whole forward in one launch. Program p handles chunk p % C of row p // C: mu = a*x + b*v (-> mean
    if WRITE_MEAN); rollout: x' = round(mu + s*z) -> xp_out; the chunk's sum of (x'-mu)^2 (x' as stored) ->
    part[p], by policy_loss_fwd_kernel's helpers and chunking (so old_log_prob - log p_theta is exactly 0
    on-policy). The last program of a row (ticket on cnt[row]) sums the row's partials in a fixed order and
    writes log_prob, std_dev_t and the row buffer. cnt (int32, >= B) is zero at launch and again after it.
    CHECK (tensor sigmas): a row whose sigmas break SPEC §2's bounds gets a NaN log-prob and sets its bits
    (from ERR_BASE) in the error word at err_ptr (grpo_guard/ops/errors.py).
    LEAN (opt-in, triton_launch.LEAN): the float64 coefficients before the first loads (fewer live registers, so
    the launch's register cap holds without spills) and the hardware bf16 rounding; the same values. With CHECK, a
    failed row's coefficients are NaN (common.row_step_coefficients), so its x', mean and gradients are NaN too,
    as on the torch backend (the default variant makes only its log p NaN)."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp, bz = r64 * sv, r64 * sx, r64 * sxp, r64 * sz
    CD: tl.constexpr = part_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    offs = start + lanes
    m = offs < D
    third_row = z_ptr + bz if ROLLOUT else xp_ptr + bxp  # the noise (rollout) or the scored x'
    if LEAN:
        std_dev_t, std, a64, b64, _beta, _dt = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row,
                                                                     DYNAMICS, PER_SAMPLE, CHECK and PER_SAMPLE)
        x, v, w, _w = load_tile(v_ptr + bv, x_ptr + bx, third_row, third_row, offs, m, CD, False)
    else:  # the loads go out first and the float64 math overlaps them
        x, v, w, _w = load_tile(v_ptr + bv, x_ptr + bx, third_row, third_row, offs, m, CD, False)
        std_dev_t, std, a64, b64, _beta, _dt = row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row,
                                                                     DYNAMICS, PER_SAMPLE)
    a = a64.to(CD)
    b = b64.to(CD)
    s = std.to(CD)
    acc = tl.zeros([BLOCK], CD)
    for it in tl.static_range(ITERS):
        if it > 0:
            offs = start + it * BLOCK + lanes
            m = offs < D
            x, v, w, _ = load_tile(v_ptr + bv, x_ptr + bx, third_row, third_row, offs, m, CD, False)
        mu = transition_mean(x, v, a, b)
        if WRITE_MEAN:
            tl.store(mean_ptr + base + offs, mu, mask=m)
        if ROLLOUT:
            stored = rounded_for(add_rn(mu, mul_rn(s, w)), xp_out_ptr, LEAN)
            tl.store(xp_out_ptr + base + offs, stored, mask=m)
            xp = stored.to(CD)
        else:
            xp = w
        acc = accumulate_sq_dev(acc, xp, mu, m)
    tl.store(part_ptr + pid, tree_sum(acc, LOG_BLOCK))
    if last_to_arrive(cnt_ptr + row, C):
        tl.store(cnt_ptr + row, 0)
        lp = log_prob_from_sum(row_total(part_ptr, row, C, CP, LOG_CP), D, s, DYNAMICS)
        if CHECK:
            if raise_errors(err_ptr, sigma_errors(sig_ptr, nxt_ptr, row, ERR_BASE)):
                lp = lp + float("nan")
        tl.store(log_prob_ptr + row, lp)
        tl.store(std_dev_t_ptr + row, std_dev_t.to(CD))
        tl.store(row_ptr + row, a)
        tl.store(row_ptr + B + row, b)
        if DYNAMICS == CPS:
            k = 2.0 / D + std * 0.0
        else:
            k = 1.0 / (std * std * D)
        tl.store(row_ptr + 2 * B + row, k.to(CD))


@triton.jit
def sde_step_bwd_kernel(v_ptr, x_ptr, xp_ptr, mean_ptr, row_ptr, g_prev_ptr, g_mean_ptr, g_lp_ptr, g_v_ptr, g_x_ptr,
                        B, D, C, sv, sx, sxp, s_glp,
                        HAS_MEAN: tl.constexpr, HAS_G_PREV: tl.constexpr, HAS_G_MEAN: tl.constexpr,
                        HAS_G_LP: tl.constexpr, NEED_G_V: tl.constexpr, NEED_G_X: tl.constexpr,
                        BLOCK: tl.constexpr, ITERS: tl.constexpr, LEAN: tl.constexpr = False):
    """g_mu = g_prev + g_mean + g_lp_i * k_i * (x' - mu); g_v = b*g_mu, g_x = a*g_mu (x' is a constant of
    log_prob), with a, b, k from the forward's row buffer. mu is read from the saved mean (HAS_MEAN) or
    recomputed from x and v bit for bit (the same expression and constants as the forward). LEAN: the hardware
    bf16 rounding of the stored gradients."""
    pid, row, start, base = chunk_of_program(C, D, BLOCK, ITERS)
    r64 = row.to(tl.int64)  # latent inputs: any stride over the batch dim, each sample contiguous
    bv, bx, bxp = r64 * sv, r64 * sx, r64 * sxp
    CD: tl.constexpr = row_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    a = tl.load(row_ptr + row)
    b = tl.load(row_ptr + B + row)
    k = a  # read by mean_grad only when HAS_G_LP
    if HAS_G_LP:
        k = tl.load(g_lp_ptr + row * s_glp).to(CD) * tl.load(row_ptr + 2 * B + row)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        m = offs < D
        g = mean_grad(g_prev_ptr + base, g_mean_ptr + base, xp_ptr + bxp, mean_ptr + base, x_ptr + bx, v_ptr + bv,
                      offs, m, a, b, k, CD, HAS_G_PREV, HAS_G_MEAN, HAS_G_LP, HAS_MEAN, BLOCK)
        store_input_grads(g_v_ptr + base, g_x_ptr + base, offs, m, a, b, g, NEED_G_V, NEED_G_X, LEAN)
