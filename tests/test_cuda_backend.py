"""The CUDA C++ backend (csrc/, grpo_guard._C) on a GPU: built, importable, and equal to the reference.

The backend-parametrized suites (test_sde_step.py, test_policy_loss.py) cover it against float64 oracles when
it is available; this module checks what is specific to it: the extension is there, its per-sample
coefficients and transition mean are bit-identical to the reference's (same float64 derivation, no FMA),
rollout x' is rounded like torch, results are deterministic, per-sample sigma tensors (with the sigma = 1
guard), mixed dtypes and non-contiguous inputs, and gradients against the reference's autograd.
Without a GPU the same tests run the kernels through the CPU emulator on CPU tensors (tests/_cuda_emu.py), and
are skipped where it is not built.
"""
import math

import pytest
import torch

import grpo_guard as gg
from grpo_guard import reference as ref
from grpo_guard.ops import cuda_backend, requests

import _cuda_emu

EMULATED = not torch.cuda.is_available() and _cuda_emu.module() is not None
pytestmark = [] if EMULATED else [pytest.mark.gpu]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DYNAMICS = ["flow", "dance", "cps"]
FUSED_METHODS = [m for m in ref.METHODS if m != "dppo"]  # dppo runs on the torch backend (test_dppo.py)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True, params=["strided", "vec"])
def layout(request, monkeypatch):
    """Every test in both element layouts of the chunk kernels (cuda_backend.V2, csrc/gg_kernels.h)."""
    monkeypatch.setattr(cuda_backend, "V2", request.param == "vec")
    return request.param


@pytest.fixture(autouse=True)
def _need_extension(request):
    if request.node.originalname != "test_extension_is_built" and cuda_backend.unsupported_reason(DEV) is not None:
        pytest.skip(cuda_backend.unsupported_reason(DEV))


def test_extension_is_built():
    """On a GPU machine the extension must have been built (GRPO_GUARD_BUILD_CUDA=1 pip install ...)."""
    assert cuda_backend.unsupported_reason(torch.device(DEV)) is None
    assert "cuda" in gg.available_backends(DEV)
    if not EMULATED:
        assert cuda_backend.unsupported_reason(torch.device("cpu")) is not None


def _sigmas(kind, B):
    if kind == "float":
        return 0.75, 0.6
    sig = torch.linspace(1.0, 0.3, B, dtype=torch.float64, device=DEV)  # sample 0 at sigma == 1 (flow guard)
    return sig, sig - 0.07


def _run(backend, fn, *args, **kwargs):
    with gg.backend(backend):
        out = fn(*args, **kwargs)
    assert gg.last_backend() == backend
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_sde_step_matches_reference(dtype, dynamics, sigma_kind, seed):
    B, shape = 5, (3, 37, 41)  # D = 4551: several chunks and a ragged last one
    v = torch.randn(B, *shape, device=DEV).to(dtype)
    x = torch.randn(B, *shape, device=DEV).to(dtype)
    sig, nxt = _sigmas(sigma_kind, B)
    noise = torch.randn(x.shape, device=DEV, dtype=ref.compute_dtype(x))
    got = _run("cuda", gg.sde_step, v, x, sig, nxt, dynamics=dynamics, noise=noise)
    want = _run("torch", gg.sde_step, v, x, sig, nxt, dynamics=dynamics, noise=noise)
    # same float64 coefficients, same rounded products and sum: bit-identical mean and rollout sample
    assert torch.equal(got.prev_sample_mean, want.prev_sample_mean)
    assert got.prev_sample.dtype == dtype and torch.equal(got.prev_sample, want.prev_sample)
    assert torch.equal(got.std_dev_t, want.std_dev_t)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.log_prob, want.log_prob, rtol=rtol, atol=rtol)
    # scoring the stored sample gives the rollout's log-prob exactly
    again = _run("cuda", gg.sde_step, v, x, sig, nxt, dynamics=dynamics, prev_sample=got.prev_sample)
    assert torch.equal(again.log_prob, got.log_prob) and torch.equal(again.prev_sample_mean, got.prev_sample_mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("rollout", [True, False])
def test_sde_step_gradients(dtype, dynamics, rollout, seed):
    B, shape = 3, (4, 33, 35)
    v0 = torch.randn(B, *shape, device=DEV).to(dtype)
    x0 = torch.randn(B, *shape, device=DEV).to(dtype)
    cd = ref.compute_dtype(x0)
    noise = torch.randn(x0.shape, device=DEV, dtype=cd)
    prev = None if rollout else (x0.to(cd) + 0.1 * noise).to(dtype)
    g_lp, g_mu = torch.randn(B, device=DEV, dtype=cd), torch.randn(x0.shape, device=DEV, dtype=cd)
    g_prev = torch.randn(x0.shape, device=DEV).to(dtype)
    grads = {}
    for name in ("cuda", "torch"):
        v, x = v0.clone().requires_grad_(), x0.clone().requires_grad_()
        kw = dict(noise=noise) if rollout else dict(prev_sample=prev)
        out = _run(name, gg.sde_step, v, x, 0.6, 0.45, dynamics=dynamics, **kw)
        total = (out.log_prob * g_lp).sum() + (out.prev_sample_mean * g_mu).sum()
        if rollout:
            total = total + (out.prev_sample.to(cd) * g_prev.to(cd)).sum()
        total.backward()
        grads[name] = (v.grad, x.grad)
    tol = 1e-10 if dtype == torch.float64 else max(1e-5, torch.finfo(dtype).eps)
    for got, want in zip(grads["cuda"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_sde_step_gradcheck_float64(dynamics):
    v = torch.randn(2, 3, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 3, 5, device=DEV, dtype=torch.float64)
    noise = torch.randn(2, 3, 5, device=DEV, dtype=torch.float64)
    sig, nxt = _sigmas("tensor", 2)

    def f(v, x):
        with gg.backend("cuda"):
            a = gg.sde_step(v, x, sig, nxt, dynamics=dynamics, prev_sample=prev)
            b = gg.sde_step(v, x, sig, nxt, dynamics=dynamics, noise=noise)
        # a rollout's log_prob treats x' as a constant while finite differences move it: scored outputs only
        return a.log_prob, a.prev_sample_mean, b.prev_sample

    assert torch.autograd.gradcheck(f, (v, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def _policy_case(dtype, dynamics, B=6, shape=(4, 30, 31), sigma_kind="float"):
    """A rollout on the cuda backend and a perturbed model output whose log-ratios straddle the clip range
    ``eps`` (scaled up for bf16/fp16 inputs, where a 1e-6 change of v would round away)."""
    sig, nxt = _sigmas(sigma_kind, B)
    v_old = torch.randn(B, *shape, device=DEV).to(dtype)
    x = torch.randn(B, *shape, device=DEV).to(dtype)
    roll = _run("cuda", gg.sde_step, v_old, x, sig, nxt, dynamics=dynamics)
    D = x[0].numel()
    z = (roll.prev_sample.to(roll.prev_sample_mean.dtype) - roll.prev_sample_mean).reshape(B, -1)
    coef = ref.step_coefficients(sig, nxt, 0.7, dynamics)
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 3e3
    target = scale * torch.tensor([-8e-6, -3e-6, -1e-6, 5e-7, 3e-6, 9e-6][:B], device=DEV, dtype=torch.float64)
    dv = (z.double() / (z.double().square().sum(1, keepdim=True)) * D * target[:, None]
          / (coef.b.to(DEV)[:, None] / coef.std.to(DEV)[:, None]))
    v = (v_old.double() + dv.reshape(v_old.shape)).to(dtype)
    adv = torch.tensor([1.0, -2.0, 0.5, -0.7, 6.0, -1.5][:B], device=DEV)
    return dict(v=v, v_old=v_old, x=x, roll=roll, sig=sig, nxt=nxt, adv=adv, eps=2e-6 * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("method", FUSED_METHODS)
@pytest.mark.parametrize("old", ["mean", "model_output", "log_prob"])
def test_policy_loss_matches_reference(dtype, dynamics, method, old, seed):
    if old == "log_prob" and method != "grpo":
        pytest.skip("only grpo is defined from old_log_prob alone")
    c = _policy_case(dtype, dynamics, sigma_kind="tensor" if dynamics != "cps" else "float")
    olds = {"mean": dict(old_prev_sample_mean=c["roll"].prev_sample_mean),
            "model_output": dict(old_model_output=c["v_old"]),
            "log_prob": dict(old_log_prob=c["roll"].log_prob)}[old]
    res = {}
    for name in ("cuda", "torch"):
        v = c["v"].clone().requires_grad_()
        loss, stats = _run(name, gg.policy_loss, v, c["x"], c["roll"].prev_sample, c["sig"], c["nxt"], c["adv"],
                           dynamics=dynamics, method=method, clip_range=c["eps"], **olds)
        loss.backward()
        res[name] = (loss, stats, v.grad)
    (loss, stats, grad), (loss_w, stats_w, grad_w) = res["cuda"], res["torch"]
    assert loss.dtype == loss_w.dtype and loss.shape == () and set(stats) == set(stats_w)
    f64 = dtype == torch.float64
    # log p difference of O(1) terms (old_log_prob) loses ~1e-7 absolute in float32; closed forms do not
    lr_atol = 1e-14 if f64 else (1e-6 if old == "log_prob" else 1e-12)
    lr_w = stats_w["log_ratio"]
    torch.testing.assert_close(stats["log_ratio"], lr_w, rtol=1e-9 if f64 else 1e-4, atol=lr_atol)
    if "bias" in stats_w:
        torch.testing.assert_close(stats["bias"], stats_w["bias"], rtol=1e-9 if f64 else 1e-4, atol=1e-14)
    # the log-ratios sit >= 0.9 eps from the clip bounds: identical decisions
    assert stats["clipfrac"].item() == stats_w["clipfrac"].item()
    r_atol = 1e-14 if f64 else 2 * lr_atol + 2e-7
    torch.testing.assert_close(stats["ratio_mean"], stats_w["ratio_mean"], rtol=0, atol=r_atol)
    torch.testing.assert_close(stats["ratio_std"], stats_w["ratio_std"], rtol=1e-5, atol=2 * r_atol)
    torch.testing.assert_close(stats["approx_kl"], stats_w["approx_kl"], rtol=1e-5,
                               atol=2 * lr_atol * lr_w.abs().max().item() + 1e-20)
    loss_atol = 1e-12 if f64 else (2e-4 if old == "log_prob" else 1e-5)
    torch.testing.assert_close(loss, loss_w, rtol=1e-6, atol=loss_atol)
    gtol = 1e-9 if f64 else (2e-3 if old == "log_prob" else 1e-4)
    gtol = max(gtol, torch.finfo(dtype).eps)
    # the gradient is returned in v's dtype: fp16's subnormals (steps of 6e-8) may round to the other neighbour
    subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(grad, grad_w, rtol=gtol, atol=gtol * grad_w.abs().max().item() + subnormal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_on_policy_log_ratio_is_exactly_zero(dtype, dynamics, seed):
    B, shape = 4, (16, 64, 64)  # SD3.5 512 px latent: 32 chunks per sample
    v = torch.randn(B, *shape, device=DEV).to(dtype)
    x = torch.randn(B, *shape, device=DEV).to(dtype)
    roll = _run("cuda", gg.sde_step, v, x, 0.9, 0.8, dynamics=dynamics)
    adv = torch.randn(B, device=DEV)
    olds = [dict(old_prev_sample_mean=roll.prev_sample_mean), dict(old_model_output=v)]
    for method in FUSED_METHODS:
        for old in olds + ([dict(old_log_prob=roll.log_prob)] if method == "grpo" else []):
            vg = v.clone().requires_grad_()
            loss, stats = _run("cuda", gg.policy_loss, vg, x, roll.prev_sample, 0.9, 0.8, adv, dynamics=dynamics,
                               method=method, **old)
            assert torch.all(stats["log_ratio"] == 0), (method, list(old), stats["log_ratio"])
            assert stats["ratio_mean"].item() == 1.0 and stats["clipfrac"].item() == 0.0
            loss.backward()
            assert torch.isfinite(vg.grad).all()


def test_deterministic(seed):
    c = _policy_case(torch.bfloat16, "flow", B=4, shape=(16, 128, 128))
    outs = []
    for _ in range(2):
        v = c["v"].clone().requires_grad_()
        loss, stats = _run("cuda", gg.policy_loss, v, c["x"], c["roll"].prev_sample, c["sig"], c["nxt"], c["adv"],
                           old_prev_sample_mean=c["roll"].prev_sample_mean)
        loss.backward()
        step = _run("cuda", gg.sde_step, c["v"], c["x"], c["sig"], c["nxt"], prev_sample=c["roll"].prev_sample)
        outs.append((loss, stats["log_ratio"], v.grad, step.log_prob))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_policy_loss_gradcheck_float64(dynamics, method):
    c = _policy_case(torch.float64, dynamics, B=4, shape=(3, 7))
    v = c["v"].clone().requires_grad_()

    def f(v):
        with gg.backend("cuda"):
            return gg.policy_loss(v, c["x"], c["roll"].prev_sample, c["sig"], c["nxt"], c["adv"].double(),
                                  old_prev_sample_mean=c["roll"].prev_sample_mean, dynamics=dynamics,
                                  method=method, clip_range=c["eps"])[0]

    assert torch.autograd.gradcheck(f, (v,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_mixed_dtypes_and_non_contiguous(seed):
    B = 3
    v = torch.randn(B, 40, 50, device=DEV).transpose(1, 2)  # float32, non-contiguous
    x = torch.randn(B, 50, 40, device=DEV).to(torch.bfloat16)
    noise = torch.randn(x.shape, device=DEV)
    got = _run("cuda", gg.sde_step, v, x, 0.5, 0.4, noise=noise)
    want = _run("torch", gg.sde_step, v, x, 0.5, 0.4, noise=noise)
    assert got.prev_sample.dtype == torch.bfloat16 and torch.equal(got.prev_sample, want.prev_sample)
    assert torch.equal(got.prev_sample_mean, want.prev_sample_mean)
    torch.testing.assert_close(got.log_prob, want.log_prob, rtol=2e-6, atol=2e-6)
    loss, stats = _run("cuda", gg.policy_loss, v, x, got.prev_sample, 0.5, 0.4, torch.ones(B, device=DEV),
                       old_prev_sample_mean=got.prev_sample_mean.transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.all(stats["log_ratio"] == 0)
    assert math.isclose(loss.item(), -1.0 / 0.1, rel_tol=1e-6)  # guard: mean_i w A r = -1/|dt|


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_layout_sums_do_not_depend_on_alignment(layout, dtype, seed):
    """The vector layout moves 16 bytes at a time only where every row is aligned, element by element otherwise;
    the same elements in the same order either way: log p and the policy-loss sums are bit-identical for a batch
    whose rows are misaligned (an odd batch stride) and for its contiguous copy, and a ragged last chunk works."""
    if layout != "vec":
        pytest.skip("the vector layout's property")
    B, D = 3, 4104  # several chunks; D a multiple of 8, so a contiguous copy has aligned rows
    big_v = torch.randn(B, D + 1, device=DEV).to(dtype)
    big_x = torch.randn(B, D + 1, device=DEV).to(dtype)
    v, x = big_v[:, 1:], big_x[:, 1:]  # rows start 1 element late: misaligned
    noise = torch.randn(B, D, device=DEV, dtype=ref.compute_dtype(x))
    adv = torch.randn(B, device=DEV)
    results = []
    for vv, xx in ((v, x), (v.contiguous(), x.contiguous())):
        roll = _run("cuda", gg.sde_step, vv, xx, 0.8, 0.7, noise=noise)
        loss, st = _run("cuda", gg.policy_loss, vv, xx, roll.prev_sample, 0.8, 0.7, adv, method="grpo",
                        old_log_prob=roll.log_prob + 1e-4)
        results.append((roll.prev_sample, roll.log_prob, loss, st["log_ratio"]))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    ragged = _run("cuda", gg.sde_step, v[:, :-3], x[:, :-3], 0.8, 0.7, noise=noise[:, :-3])
    want = _run("torch", gg.sde_step, v[:, :-3], x[:, :-3], 0.8, 0.7, noise=noise[:, :-3])
    assert torch.equal(ragged.prev_sample, want.prev_sample)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ragged.log_prob, want.log_prob, rtol=rtol, atol=rtol)


def test_rollout_without_mean_skips_it(layout, seed):
    """return_mean=False in a rollout without gradients: the vector layout does not write the mean (the kernel's
    only latent-sized float32 output), and x' and log p are those of the call that does."""
    v, x = torch.randn(2, 4, 64, device=DEV).bfloat16(), torch.randn(2, 4, 64, device=DEV).bfloat16()
    noise = torch.randn(v.shape, device=DEV)
    with torch.no_grad():
        a = _run("cuda", gg.sde_step, v, x, 0.8, 0.7, noise=noise, return_mean=False)
        b = _run("cuda", gg.sde_step, v, x, 0.8, 0.7, noise=noise)
        req = requests.sde_request(v, x, 0.8, 0.7, noise_level=0.7, dynamics="flow", prev_sample=None,
                                   generator=None, noise=noise, validate=True, return_mean=False)
        v_, x_, p_, noise_, sched, round_mode, need_mean, vec = cuda_backend._sde_inputs(req)
        outs = cuda_backend._ext.sde_forward(v_, x_, p_, noise_, *sched, round_mode, need_mean, vec)
    assert a.prev_sample_mean is None and b.prev_sample_mean is not None
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert (outs[1] is None) == (layout == "vec")


@pytest.mark.parametrize("block_order", ["in order", "shuffled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("B, shape", [(5, (3, 37, 41)), (1, (5, 7))], ids=["B5-3chunks", "B1-1chunk"])
def test_single_launch_forward_gives_the_two_launch_bits(layout, dtype, block_order, B, shape, monkeypatch, seed):
    """The second set's single-launch forwards (cuda_backend.V2_FUSED; csrc/gg_kernels.h): the last block of each
    sample finishes it and the last sample the batch. Every output, gradient and error bit equals the two-launch
    forward's, bit for bit, twice in a row (the counters are zero again after a launch), for sde_step (rollout,
    scoring) and policy_loss (each old input, methods, a sample whose tensor sigmas fail the check). "shuffled":
    the emulator runs the blocks in a seeded random order, so any block of a sample may be its last (on a GPU the
    order is the hardware's)."""
    if layout != "vec":
        pytest.skip("the second kernel set's property")
    if block_order == "shuffled":
        if not EMULATED:
            pytest.skip("the emulator's block order")
        monkeypatch.setenv("GG_EMU_BLOCK_SEED", str(seed % 1000 + 1))
    # D = 4551: 3 chunks per sample, a ragged last one; D = 35: one chunk, one sample (each ticket its own last)
    g = torch.Generator(device=DEV).manual_seed(seed)
    v = torch.randn(B, *shape, device=DEV, generator=g).to(dtype)
    x = torch.randn(B, *shape, device=DEV, generator=g).to(dtype)
    v_old = (v.double() + 0.02 * torch.randn(v.shape, device=DEV, generator=g, dtype=torch.float64)).to(dtype)
    noise = torch.randn(v.shape, device=DEV, generator=g, dtype=ref.compute_dtype(x))
    adv = torch.randn(B, device=DEV, generator=g)
    sig = torch.linspace(0.9, 0.5, B, dtype=torch.float64, device=DEV)
    nxt = sig - 0.1
    nxt[-1] = 0.95  # the last sample breaks sigma_next < sigma: NaN outputs and an error bit, in the same launch

    def run(v, x):
        out, codes = [], []
        roll = _run("cuda", gg.sde_step, v, x, sig, nxt, noise=noise)
        out += [roll.prev_sample, roll.log_prob, roll.std_dev_t, roll.prev_sample_mean]
        codes.append(_take_error_word())
        vg = v.clone().requires_grad_(True)
        scored = _run("cuda", gg.sde_step, vg, x, sig, nxt, prev_sample=roll.prev_sample.nan_to_num())
        scored.log_prob.nansum().backward()
        out += [scored.log_prob, scored.prev_sample_mean, vg.grad]
        codes.append(_take_error_word())
        xp = roll.prev_sample.nan_to_num()
        for method, old in (("guard", {"old_model_output": v_old}), ("dppo", {"old_model_output": v_old}),
                            ("mean_revised", {"old_prev_sample_mean": scored.prev_sample_mean.detach().nan_to_num()}),
                            ("grpo", {"old_log_prob": scored.log_prob.detach() + 1e-3})):
            vg = v.clone().requires_grad_(True)
            loss, stats = _run("cuda", gg.policy_loss, vg, x, xp, sig, nxt, adv, method=method, **old)
            loss.backward()
            out += [loss, vg.grad] + [stats[k] for k in sorted(stats)]
            codes.append(_take_error_word())
        return out, codes

    monkeypatch.setattr(cuda_backend, "V2_FUSED", False)
    want, want_codes = run(v, x)
    monkeypatch.setattr(cuda_backend, "V2_FUSED", True)
    for _ in range(2):
        run(x, v)  # other partials in the scratch memory the next calls may reuse: a finish that read a partial
        # before its block wrote it would read these
        got, codes = run(v, x)
        assert codes == want_codes and all(c != 0 for c in codes)
        for a, b in zip(got, want):
            assert torch.equal(a.nan_to_num(1.5), b.nan_to_num(1.5)) and torch.equal(a.isnan(), b.isnan())


def _take_error_word() -> int:
    """The device error word's bits (synchronizes), then cleared."""
    from grpo_guard.ops import errors
    word = errors.word(torch.device(DEV))
    bits = int(word.item())
    word.zero_()
    return bits
