"""gg.sde_step on every available backend against the float64 reference (SPEC §2)."""
import math

import pytest
import torch

import grpo_guard as gg
from grpo_guard import reference as ref

from _backends import DTYPES, tolerances
from _cases import latents, sd35_sigmas

DYNAMICS = ["flow", "dance", "cps"]


def oracle(v, x, sigma, sigma_next, **kw):
    """The reference evaluated in float64 on the CPU, on the same (exactly upcast) inputs."""
    def cpu64(t):
        return t.detach().double().cpu() if isinstance(t, torch.Tensor) else t
    kw = {k: cpu64(t) for k, t in kw.items()}
    return ref.sde_step(cpu64(v), cpu64(x), cpu64(sigma), cpu64(sigma_next), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_rollout_matches_reference(bk, dtype, dynamics, seed):
    name, device = bk
    v, x = latents(3, (4, 6, 5), dtype, device)
    noise = torch.randn(x.shape, dtype=ref.compute_dtype(x), device=device)
    out = gg.sde_step(v, x, 0.8, 0.65, noise_level=0.7, dynamics=dynamics, noise=noise)
    assert gg.last_backend() == name
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.prev_sample.dtype == dtype and out.prev_sample.shape == x.shape
    assert out.log_prob.dtype == cd and out.log_prob.shape == (3,)
    assert out.prev_sample_mean.dtype == cd and out.prev_sample_mean.shape == x.shape
    assert out.std_dev_t.shape == (3,)
    want = oracle(v, x, 0.8, 0.65, noise_level=0.7, dynamics=dynamics, noise=noise)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.prev_sample_mean.double().cpu(), want.prev_sample_mean.cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.std_dev_t.double().cpu(), want.std_dev_t.cpu(), rtol=rtol, atol=atol)
    # prev_sample is stored in the input dtype: within one unit of its last place of the exact value
    ulp = torch.finfo(dtype).eps * want.prev_sample.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.prev_sample.double().cpu() - want.prev_sample).abs() <= ulp * 1.01 + atol).all()
    # the log-prob is that of the value actually stored
    scored = oracle(v, x, 0.8, 0.65, noise_level=0.7, dynamics=dynamics, prev_sample=out.prev_sample)
    torch.testing.assert_close(out.log_prob.double().cpu(), scored.log_prob.cpu(), rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_scoring_matches_reference_per_sample_sigmas(bk, dtype, dynamics, seed):
    name, device = bk
    B = 4
    v, x = latents(B, (3, 8, 8), dtype, device)
    xp = (x.double() + 0.1 * torch.randn(x.shape, dtype=torch.float64, device=device)).to(dtype)
    sig = torch.tensor([1.0, 0.96, 0.5, 0.28], dtype=torch.float64, device=device)
    nxt = torch.tensor([0.96, 0.9, 0.4, 0.0], dtype=torch.float64, device=device)
    out = gg.sde_step(v, x, sig, nxt, dynamics=dynamics, prev_sample=xp)
    assert out.prev_sample is xp
    want = oracle(v, x, sig.cpu(), nxt.cpu(), noise_level=0.7, dynamics=dynamics, prev_sample=xp.cpu())
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.log_prob.double().cpu(), want.log_prob, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(out.prev_sample_mean.double().cpu(), want.prev_sample_mean, rtol=rtol, atol=atol)
    # per-sample tensors give what per-sample floats give
    for i in range(B):
        one = gg.sde_step(v[i:i + 1], x[i:i + 1], float(sig[i]), float(nxt[i]), dynamics=dynamics,
                          prev_sample=xp[i:i + 1])
        torch.testing.assert_close(one.log_prob.double().cpu(), out.log_prob[i:i + 1].double().cpu(),
                                   rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "scoring"])
def test_gradcheck_float64(bk, dynamics, rollout, seed):
    name, device = bk
    v, x = latents(2, (3, 4), torch.float64, device)
    v.requires_grad_(True)
    x.requires_grad_(True)
    noise = torch.randn(x.shape, dtype=torch.float64, device=device)
    xp = None if rollout else x.detach() + 0.2 * noise

    def f(v_, x_):
        out = gg.sde_step(v_, x_, 0.9, 0.7, noise_level=0.8, dynamics=dynamics, prev_sample=xp,
                          noise=noise if rollout else None)
        # in a rollout x' depends on v and x, but log_prob treats it as a constant (x'.detach(), as the
        # published code does): finite differences would move x' too, so only scoring checks log_prob
        return (out.prev_sample, out.prev_sample_mean) if rollout else (out.log_prob, out.prev_sample_mean)

    assert torch.autograd.gradcheck(f, (v, x), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_reference(bk, dtype, seed):
    name, device = bk
    v, x = latents(3, (4, 8, 8), dtype, device)
    xp = (x.double() + 0.05 * torch.randn(x.shape, dtype=torch.float64, device=device)).to(dtype)
    w_lp = torch.randn(3, device=device)
    w_mu = torch.randn(x.shape, device=device)

    def grads(fn, v_, x_):
        v_ = v_.detach().clone().requires_grad_(True)
        x_ = x_.detach().clone().requires_grad_(True)
        out = fn(v_, x_)
        ((out.log_prob.double() * w_lp.to(out.log_prob.device).double()).sum()
         + (out.prev_sample_mean.double() * w_mu.to(out.log_prob.device).double()).sum()).backward()
        return v_.grad.double().cpu(), x_.grad.double().cpu()

    got = grads(lambda a, b: gg.sde_step(a, b, 0.7, 0.6, prev_sample=xp), v, x)
    want = grads(lambda a, b: ref.sde_step(a, b, 0.7, 0.6, prev_sample=xp.double()), v.double(), x.double())
    for g, w in zip(got, want):
        # low-precision inputs get low-precision gradients: compare at the input dtype's resolution
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item())


def test_rollout_statistics(bk, seed):
    """x' = mu + s z with z ~ N(0, I): the mean log-prob of a fresh rollout is -1/2 - log s - log sqrt(2 pi)."""
    name, device = bk
    v, x = latents(2, (16, 64, 64), torch.float32, device)
    out = gg.sde_step(v, x, 0.6, 0.45, noise_level=0.7)
    s = ref.step_coefficients(0.6, 0.45, 0.7, "flow").std.item()
    expected = -0.5 - math.log(s) - ref.LOG_SQRT_2PI
    D = x[0].numel()
    # mean_D[z^2]/2 has std sqrt(2/D)/2: allow 6 sigma
    assert (out.log_prob.cpu() - expected).abs().max() < 6 * math.sqrt(2.0 / D) / 2
    z = (out.prev_sample.double() - out.prev_sample_mean.double()) / s
    assert abs(z.mean().item()) < 6 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 6 / math.sqrt(z.numel())


def test_generator_reproducible(bk):
    name, device = bk
    v, x = latents(2, (4, 4), torch.float32, device, generator=torch.Generator().manual_seed(1))
    g1 = torch.Generator(device=device).manual_seed(123)
    g2 = torch.Generator(device=device).manual_seed(123)
    a = gg.sde_step(v, x, 0.5, 0.4, generator=g1)
    b = gg.sde_step(v, x, 0.5, 0.4, generator=g2)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)


def test_sigma_one_guard(bk):
    """flow at sigma == 1 uses sigma~ = sigma' (1 - sigma would be 0): finite, and equal to the formula."""
    name, device = bk
    sig = sd35_sigmas()
    v, x = latents(2, (4, 4), torch.float64, device)
    out = gg.sde_step(v, x, sig[0], sig[1], noise_level=0.7)
    expected_std = 0.7 * math.sqrt(1.0 / (1.0 - sig[1]))
    torch.testing.assert_close(out.std_dev_t.cpu(), torch.full((2,), expected_std, dtype=torch.float64))
    dt = sig[1] - 1.0
    a = 1 + expected_std ** 2 * dt / 2
    torch.testing.assert_close(out.prev_sample_mean, a * x + dt * v)  # beta == 1 at sigma == 1
    assert torch.isfinite(out.log_prob).all()


def test_noncontiguous_inputs(bk, seed):
    name, device = bk
    v, x = latents(3, (8, 6), torch.float32, device)
    vt, xt = v.transpose(1, 2), x.transpose(1, 2)
    assert not vt.is_contiguous()
    xp = xt + 0.1
    got = gg.sde_step(vt, xt, 0.7, 0.6, prev_sample=xp)
    want = gg.sde_step(vt.contiguous(), xt.contiguous(), 0.7, 0.6, prev_sample=xp.contiguous())
    torch.testing.assert_close(got.log_prob, want.log_prob, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.prev_sample_mean, want.prev_sample_mean)
