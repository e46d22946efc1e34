"""@triton.jit helpers shared by every kernel: coefficients, the transition mean, fixed-order sums, stores.

Everything that must come out bit-identical in two kernels (mu, the squared-deviation accumulation, the
chunk and partial sums, log p) is written once here, so the on-policy log-ratio is exactly 0 by construction.
That arithmetic is never contracted into FMAs: compiled, it is explicitly rounded PTX (``mul.rn`` / ``add.rn`` /
``sub.rn``, which neither LLVM nor ptxas fuses), so ``a*x + b*v`` rounds as PyTorch's separate multiply and add
do whatever ``enable_fp_fusion`` a launcher compiles with (torch.compile's launches of user kernels do not pass
the ``enable_fp_fusion=False`` that grpo_guard's own launches do). Under the interpreter, plain numpy arithmetic.
"""
import triton
import triton.language as tl
from triton import knobs

FLOW = tl.constexpr(0)
DANCE = tl.constexpr(1)
CPS = tl.constexpr(2)
RN_ASM = tl.constexpr(not knobs.runtime.interpret)  # compiled kernels: explicitly rounded PTX arithmetic


@triton.jit
def mul_rn(a, b):
    """a * b, rounded to nearest, never fused into an FMA (float32 or float64; scalars broadcast)."""
    if RN_ASM:
        if a.dtype == tl.float64:
            r = tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                          is_pure=True, pack=1)
    else:
        r = a * b
    return r


@triton.jit
def add_rn(a, b):
    """a + b, rounded to nearest, never fused with a product into an FMA."""
    if RN_ASM:
        if a.dtype == tl.float64:
            r = tl.inline_asm_elementwise("add.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                          is_pure=True, pack=1)
    else:
        r = a + b
    return r


@triton.jit
def sub_rn(a, b):
    """a - b, rounded to nearest, never fused with a product into an FMA."""
    if RN_ASM:
        if a.dtype == tl.float64:
            r = tl.inline_asm_elementwise("sub.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                          is_pure=True, pack=1)
    else:
        r = a - b
    return r


@triton.jit
def load_sigmas(sig_ptr, nxt_ptr, sigma, sigma_next, rows, mask, PER_SAMPLE: tl.constexpr):
    """(sigma, sigma') in float64: for ``rows`` (a row index or a vector of them) from the float64 (B,)
    tensors when PER_SAMPLE, else the float64 scalars themselves (coefficients are then computed once and
    broadcast)."""
    if PER_SAMPLE:
        sig = tl.load(sig_ptr + rows, mask=mask, other=0.5).to(tl.float64)
        nxt = tl.load(nxt_ptr + rows, mask=mask, other=0.25).to(tl.float64)
    else:  # "+ float64 0": the interpreter passes tl.float64 arguments as Python floats, typed float32
        sig = sigma + tl.zeros([], tl.float64)
        nxt = sigma_next + tl.zeros([], tl.float64)
    return sig, nxt


@triton.jit
def step_coefficients(sig, nxt, eta, DYNAMICS: tl.constexpr):
    """reference.step_coefficients in float64, operation for operation (SPEC §2 table).

    flow:  std_dev_t = eta*sqrt(sigma/(1-sigma~)), sigma~ = sigma' where sigma == 1;  dance: std_dev_t = eta
           s = std_dev_t*sqrt(-dt);  a = 1 + std_dev_t^2*dt/(2 sigma);  beta = 1 + std_dev_t^2 (1-sigma)/(2 sigma);
           b = beta*dt
    cps:   s = sigma'*sin(eta*pi/2);  c = sqrt(max(sigma'^2 - s^2, 0));  a = (1-sigma') + c;
           b = (1-sigma) c - sigma (1-sigma');  beta = b/dt
    Returns (std_dev_t, s, a, b, beta, dt), float64, shaped like ``sig``.
    """
    eta = eta + tl.zeros([], tl.float64)  # exact: see load_sigmas
    dt = nxt - sig
    if DYNAMICS == CPS:
        pi = tl.full([], 3.141592653589793, tl.float64)
        std = nxt * tl.sin(eta * pi / 2.0)
        std_dev_t = std
        c = tl.sqrt(tl.maximum(sub_rn(mul_rn(nxt, nxt), mul_rn(std, std)), 0.0))
        a = (1.0 - nxt) + c
        b = sub_rn(mul_rn(1.0 - sig, c), mul_rn(sig, 1.0 - nxt))
        beta = b / dt
    else:
        if DYNAMICS == FLOW:
            sig_tilde = tl.where(sig == 1.0, nxt, sig)
            std_dev_t = eta * tl.sqrt(sig / (1.0 - sig_tilde))
        else:
            std_dev_t = eta + sig * 0.0
        var = std_dev_t * std_dev_t
        std = std_dev_t * tl.sqrt(-dt)
        a = 1.0 + var * dt / (2.0 * sig)
        beta = 1.0 + var * (1.0 - sig) / (2.0 * sig)
        b = beta * dt
    return std_dev_t, std, a, b, beta, dt


@triton.jit
def clamp_nan(x, lo, hi):
    """min(max(x, lo), hi) with NaN kept NaN, as torch.clamp does (tl.minimum/maximum drop NaN by default)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def transition_mean(x, v, a, b):
    """mu = a*x + b*v in the compute dtype (x, v already upcast; a, b cast once per sample), two rounded
    products and a rounded sum (reference.transition_mean)."""
    return add_rn(mul_rn(a, x), mul_rn(b, v))


@triton.jit
def chunk_of_program(C, D, BLOCK: tl.constexpr, ITERS):
    """(pid, row, start, base) of this program. Grid axis 0 is B x C chunks: program pid reduces chunk
    pid % C of row pid // C, the elements [start, start + BLOCK*ITERS) of the row that begins at base (int64)."""
    pid = tl.program_id(0)
    row = pid // C
    return pid, row, (pid % C) * (BLOCK * ITERS), row.to(tl.int64) * D


@triton.jit
def row_step_coefficients(sig_ptr, nxt_ptr, sigma, sigma_next, eta, row, DYNAMICS: tl.constexpr,
                          PER_SAMPLE: tl.constexpr, NAN_FAILED: tl.constexpr = False,
                          ZERO_NEXT_FAILS: tl.constexpr = False):
    """:func:`step_coefficients` of one row: its (sigma, sigma') loaded (PER_SAMPLE) or broadcast, float64.
    NAN_FAILED (tensor sigmas, the device-side checks of the lean kernels): a row whose sigmas break SPEC §2's
    bounds (:func:`sigma_error_bits`; ZERO_NEXT_FAILS: sigma' == 0 too) gets sigma = NaN, as requests.checked
    gives the torch backend, so its x', mean, log p and gradients are all NaN."""
    sig, nxt = load_sigmas(sig_ptr, nxt_ptr, sigma, sigma_next, row, True, PER_SAMPLE)
    if NAN_FAILED:
        bad = sigma_error_bits(sig, nxt, 0) != 0
        if ZERO_NEXT_FAILS:
            bad = bad | (nxt == 0.0)
        sig = tl.where(bad, float("nan"), sig)
    return step_coefficients(sig, nxt, eta, DYNAMICS)


@triton.jit
def load_tile(v_row, x_row, third_row, fourth_row, offs, m, CD: tl.constexpr, FOURTH: tl.constexpr):
    """(x, v, third, fourth) of one tile of a sample, upcast to CD (pointers at the sample's start; masked lanes 0):
    the latent streams a forward reads. ``fourth`` only when FOURTH (else x again, unused)."""
    x = tl.load(x_row + offs, mask=m, other=0.0).to(CD)
    v = tl.load(v_row + offs, mask=m, other=0.0).to(CD)
    third = tl.load(third_row + offs, mask=m, other=0.0).to(CD)
    if FOURTH:
        fourth = tl.load(fourth_row + offs, mask=m, other=0.0).to(CD)
    else:
        fourth = x
    return x, v, third, fourth


@triton.jit
def accumulate_sq_dev(acc, xp, mu, mask):
    """acc + (x' - mu)^2, elementwise (masked lanes add 0): the log-prob's running sum."""
    d = xp - mu
    return add_rn(acc, tl.where(mask, mul_rn(d, d), 0.0))


@triton.jit
def tree_sum_rows(t, LOG_N: tl.constexpr):
    """Sum of each row of ``t`` [R, 2**LOG_N] -> [R], as a fixed pairwise tree: (0+1), (2+3), ... then
    pairs of pairs. Each addition has two operands, so the result does not depend on how the compiler
    lays the elements out over threads: two kernels summing equal values get equal bits."""
    for _ in tl.static_range(LOG_N):
        t = tl.sum(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)), axis=2)
    return tl.sum(t, axis=1)


@triton.jit
def tree_sum(acc, LOG_N: tl.constexpr):
    """Sum of a [2**LOG_N] vector by the fixed pairwise tree of :func:`tree_sum_rows`, as a scalar."""
    for _ in tl.static_range(LOG_N):
        acc = tl.sum(tl.reshape(acc, (acc.shape[0] // 2, 2)), axis=1)
    return tl.sum(acc, axis=0)


@triton.jit
def row_totals(part_ptr, rows, row_mask, C, CP: tl.constexpr, LOG_CP: tl.constexpr):
    """Per-row sum of the C chunk partials part[row, 0:C] (row-major, C per row), fixed order."""
    cols = tl.arange(0, CP)
    m = row_mask[:, None] & (cols[None, :] < C)
    t = tl.load(part_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
    return tree_sum_rows(t, LOG_CP)


@triton.jit
def log_prob_from_total(total, D, std, DYNAMICS: tl.constexpr):
    """log p from the row's sum of (x'-mu)^2 (SPEC §2, mean over D), in float64:
    flow/dance: -mean/(2 s^2) - log s - log sqrt(2 pi);  cps: -mean."""
    mean = total.to(tl.float64) / D
    if DYNAMICS == CPS:
        lp = -mean
    else:
        log_sqrt_2pi = tl.full([], 0.9189385332046727, tl.float64)
        lp = sub_rn(sub_rn(-mean / (2.0 * std * std), tl.log(std)), log_sqrt_2pi)
    return lp


@triton.jit
def rounded_for(x, ptr, NATIVE: tl.constexpr = False):
    """``x`` (float32/64) rounded to ``ptr``'s element type, round-to-nearest-even. bf16 is rounded by hand
    (the interpreter truncates), so the value stored is the one a later kernel loads, on every platform.
    NATIVE (the opt-in lean kernels, compiled only): the hardware conversion (cvt.rn.bf16.f32, also
    round-to-nearest-even: the same bits in 3-5 fewer instructions per element)."""
    ty = ptr.dtype.element_ty
    if ty == tl.bfloat16 and NATIVE and RN_ASM:
        return x.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne")
    elif ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        r = tl.where(x != x, x.to(tl.float32), bits.to(tl.float32, bitcast=True))
        return r.to(tl.bfloat16)
    else:
        return x.to(ty)


# ---- single-launch forward (fused finish): helpers -----------------------------------------------------------

@triton.jit
def last_to_arrive(cnt_ptr, n):
    """True in exactly one of the ``n`` programs that call this on the int32 counter at ``cnt_ptr``: the last
    to arrive, which then sees every store the others made before their call (the CTA barrier orders this
    program's stores before its ticket; the ticket is an acq_rel atomic at GPU scope). The winner must reset
    the counter to 0 (``tl.store(cnt_ptr, 0)``), so the buffer is zero again for the next launch (reusable,
    CUDA-graph safe). Loads of what the others stored must bypass L1 (cache_modifier=".cg")."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == n - 1


@triton.jit
def sigma_error_bits(sig, nxt, ERR_BASE: tl.constexpr):
    """The error-word bits (grpo_guard/ops/errors.py) of tensor sigmas (float64 values, elementwise): bit
    ERR_BASE unless 0 < sigma <= 1, bit ERR_BASE + 1 unless 0 <= sigma' < sigma (NaN fails every comparison);
    int32, 0 where valid."""
    bad = tl.where((sig > 0.0) & (sig <= 1.0), 0, 1 << ERR_BASE)
    return bad | tl.where((nxt >= 0.0) & (nxt < sig), 0, 1 << (ERR_BASE + 1))


@triton.jit
def sigma_errors(sig_ptr, nxt_ptr, row, ERR_BASE: tl.constexpr):
    """:func:`sigma_error_bits` of row ``row``'s tensor sigmas."""
    return sigma_error_bits(tl.load(sig_ptr + row), tl.load(nxt_ptr + row), ERR_BASE)


@triton.jit
def raise_errors(err_ptr, bad):
    """OR the bits ``bad`` (int32 scalar) into the error word; returns True if any is set."""
    failed = bad != 0
    if failed:
        tl.atomic_or(err_ptr, bad, sem="relaxed")
    return failed


@triton.jit
def raise_row_errors(err_ptr, bad, mask):
    """OR the bits of every row of ``bad`` (int32 vector; rows outside ``mask`` ignored) into the error word."""
    tl.atomic_or(err_ptr + bad * 0, bad, mask=mask & (bad != 0), sem="relaxed")


@triton.jit
def row_total(part_ptr, row, C, CP: tl.constexpr, LOG_CP: tl.constexpr):
    """Sum of row ``row``'s C chunk partials part[row*C : row*C + C] by the fixed tree of :func:`tree_sum`
    (zero-padded to CP): the same bits as :func:`row_totals` gives that row. Loads bypass L1 (see
    :func:`last_to_arrive`)."""
    cols = tl.arange(0, CP)
    p = tl.load(part_ptr + row * C + cols, mask=cols < C, other=0.0, cache_modifier=".cg")
    return tree_sum(p, LOG_CP)


@triton.jit
def log_prob_from_sum(total, D, s, DYNAMICS: tl.constexpr):
    """log p from the row's sum of (x'-mu)^2 (SPEC §2, mean over D), in the dtype of ``total`` and ``s`` (the
    compute dtype, as reference.log_prob_from_mean): flow/dance -mean/(2 s^2) - log s - log sqrt(2 pi);
    cps -mean. sde_step and policy_loss (old_log_prob) both call it, so the on-policy log-ratio is exactly 0."""
    mean = total / D
    if DYNAMICS == CPS:
        lp = -mean
    else:
        lp = sub_rn(sub_rn(-mean / (2.0 * s * s), tl.log(s)), tl.zeros_like(s) + 0.9189385332046727)
    return lp


@triton.jit
def expm1_f64(x):
    """exp(x) - 1 in float64 without cancellation near 0 (Kahan: (u - 1) * x / log u, u = exp x)."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where((um1 == 0.0) | (um1 == -1.0), 1.0, um1)
    r = tl.where(um1 == 0.0, x, tl.where(um1 == -1.0, -1.0, safe * x / tl.log(tl.where(um1 == 0.0, 2.0, u))))
    return tl.where(tl.abs(x) > 0.5, um1, r)


@triton.jit
def expm1_cd(x):
    """exp(x) - 1 in x's dtype without cancellation near 0 (the ratio statistics, reference.summarize).
    float64: :func:`expm1_f64`; float32: Taylor to x^8/8! for |x| < 1/2 (truncation below 1e-8 relative),
    exp(x) - 1 beyond."""
    if x.dtype == tl.float64:
        r = expm1_f64(x)
    else:
        p = 1.0 + x / 8.0
        p = 1.0 + x / 7.0 * p
        p = 1.0 + x / 6.0 * p
        p = 1.0 + x / 5.0 * p
        p = 1.0 + x / 4.0 * p
        p = 1.0 + x / 3.0 * p
        p = 1.0 + x / 2.0 * p
        r = tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)
    return r
