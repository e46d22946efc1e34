"""grpo_guard.compat.flow_grpo.sde_step_with_logprob against what Flow-GRPO's published eager function computes.

``published_sde_step`` below is this project's own re-implementation of the math of Flow-GRPO's
``sde_step_with_logprob`` (yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), written
term by term the way it is published (float32, differences of large terms included). It is the oracle of "what
flow_grpo computes", compared on a real diffusers FlowMatchEulerDiscreteScheduler(shift=3), 10 steps (SD3.5-M as
Flow-GRPO trains it).
"""
import math

import pytest
import torch

import grpo_guard as gg
from grpo_guard.compat.flow_grpo import sde_step_with_logprob


diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers; "
                                "it belongs in the `test` extra)")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SHAPE = (16, 8, 8)
SDE_TYPES = ["sde", "cps"]


def published_sde_step(scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None,
                       generator=None, sde_type="sde"):
    """Flow-GRPO's eager SDE step and log-prob, as published: everything in float32, sigma from the scheduler."""
    v = model_output.float()
    x = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    idx = [scheduler.index_for_timestep(t) for t in timestep]
    bshape = (-1,) + (1,) * (x.dim() - 1)
    sig = scheduler.sigmas[idx].view(bshape)
    sig_next = scheduler.sigmas[[i + 1 for i in idx]].view(bshape)
    dt = sig_next - sig
    if sde_type == "sde":
        guard = torch.where(sig == 1, scheduler.sigmas[1].item(), sig)
        std_dev_t = noise_level * torch.sqrt(sig / (1 - guard))
        mean = (x * (1 + std_dev_t ** 2 / (2 * sig) * dt)
                + v * (1 + std_dev_t ** 2 * (1 - sig) / (2 * sig)) * dt)
        s = std_dev_t * torch.sqrt(-dt)
        if prev_sample is None:
            z = randn_tensor(v.shape, generator=generator, device=v.device, dtype=v.dtype)
            prev_sample = mean + s * z
        lp = (-(prev_sample.detach() - mean) ** 2 / (2 * s ** 2) - torch.log(s)
              - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    else:
        std_dev_t = sig_next * math.sin(noise_level * math.pi / 2)
        x0_hat = x - sig * v
        x1_hat = x + v * (1 - sig)
        mean = x0_hat * (1 - sig_next) + x1_hat * torch.sqrt(sig_next ** 2 - std_dev_t ** 2)
        if prev_sample is None:
            z = randn_tensor(v.shape, generator=generator, device=v.device, dtype=v.dtype)
            prev_sample = mean + std_dev_t * z
        lp = -(prev_sample.detach() - mean) ** 2
    lp = lp.mean(dim=tuple(range(1, lp.dim())))
    return prev_sample, lp, mean, std_dev_t


@pytest.fixture(scope="module")
def scheduler():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    return s


def _inputs(B, dtype=torch.float32):
    return torch.randn(B, *SHAPE).to(dtype), torch.randn(B, *SHAPE).to(dtype)


def _close(ours, theirs, sde_type, ps_tol=1e-6):
    """prev_sample / mean to ~1e-6, log_prob to ~1e-5 relative, std_dev_t to float32 rounding."""
    p, lp, m, sd = ours
    tp, tlp, tm, tsd = theirs
    torch.testing.assert_close(m, tm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.float(), tp, rtol=ps_tol, atol=ps_tol)
    torch.testing.assert_close(lp, tlp, rtol=1e-5, atol=1e-6 if sde_type == "cps" else 1e-5)
    assert sd.shape == tsd.shape
    torch.testing.assert_close(sd, tsd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("step", range(9), ids=lambda i: f"step{i}")
def test_rollout_matches_published(scheduler, sde_type, step, seed):
    """Same generator seed -> the same x', and the same log-prob, mean and std as Flow-GRPO's function."""
    B = 3
    v, x = _inputs(B)
    t = scheduler.timesteps[step].repeat(B)
    ours = sde_step_with_logprob(scheduler, v, t, x, noise_level=0.7, generator=torch.Generator().manual_seed(seed),
                                 sde_type=sde_type)
    assert gg.last_backend() is not None  # it went through grpo_guard's dispatch
    theirs = published_sde_step(scheduler, v, t, x, noise_level=0.7,
                                generator=torch.Generator().manual_seed(seed), sde_type=sde_type)
    assert ours[0].dtype == torch.float32 and ours[1].shape == (B,) and ours[2].shape == x.shape
    assert ours[3].shape == (B, 1, 1, 1)
    _close(ours, theirs, sde_type)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_scoring_per_sample_timesteps(scheduler, sde_type, seed):
    """Training: score a given x' with a different timestep per sample (sigma == 1 included)."""
    steps = [0, 3, 8, 1, 5]
    B = len(steps)
    v, x = _inputs(B)
    t = scheduler.timesteps[steps]
    x_next = published_sde_step(scheduler, v, t, x, sde_type=sde_type,
                                generator=torch.Generator().manual_seed(seed))[0].detach()
    v_new = v + 0.01 * torch.randn_like(v)  # a policy change: x' is no longer the mean + s*z of v_new
    ours = sde_step_with_logprob(scheduler, v_new, t, x, prev_sample=x_next, sde_type=sde_type)
    theirs = published_sde_step(scheduler, v_new, t, x, prev_sample=x_next, sde_type=sde_type)
    assert ours[0] is x_next
    _close(ours, theirs, sde_type)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_gradient_matches_published(scheduler, sde_type, seed):
    steps = [1, 4, 7]
    v, x = _inputs(3)
    t = scheduler.timesteps[steps]
    x_next = published_sde_step(scheduler, v, t, x, sde_type=sde_type,
                                generator=torch.Generator().manual_seed(seed))[0].detach()
    v_new = (v + 0.01 * torch.randn_like(v)).requires_grad_(True)
    w = torch.randn(3)
    (sde_step_with_logprob(scheduler, v_new, t, x, prev_sample=x_next, sde_type=sde_type)[1] * w).sum().backward()
    g_ours = v_new.grad.clone()
    v_new.grad = None
    (published_sde_step(scheduler, v_new, t, x, prev_sample=x_next, sde_type=sde_type)[1] * w).sum().backward()
    torch.testing.assert_close(g_ours, v_new.grad, rtol=1e-4, atol=1e-9)


def test_step0_sigma_one(scheduler, seed):
    """At step 0 sigma == 1: std_dev_t uses the sigma == 1 guard (sigma~ = sigmas[1]) and stays finite."""
    B = 2
    v, x = _inputs(B)
    t = scheduler.timesteps[:1].repeat(B)
    assert float(scheduler.sigmas[0]) == 1.0
    gen = torch.Generator().manual_seed(seed)
    ours = sde_step_with_logprob(scheduler, v, t, x, generator=gen)
    theirs = published_sde_step(scheduler, v, t, x, generator=torch.Generator().manual_seed(seed))
    sigma1 = float(scheduler.sigmas[1])
    want_std = 0.7 * math.sqrt(1.0 / (1.0 - sigma1))
    assert torch.isfinite(ours[1]).all() and torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[3].flatten().double(), torch.full((B,), want_std, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    _close(ours, theirs, "sde")
    # a single timestep value for the whole batch is accepted too
    ours_scalar = sde_step_with_logprob(scheduler, v, scheduler.timesteps[0], x,
                                        generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours_scalar[0], ours[0], rtol=0, atol=0)


def test_generator_list_matches_diffusers(scheduler, seed):
    """A list of per-sample generators draws sample by sample, as diffusers' randn_tensor does."""
    B = 3
    v, x = _inputs(B)
    t = scheduler.timesteps[[2, 2, 6]]
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(B)]  # noqa: E731
    ours = sde_step_with_logprob(scheduler, v, t, x, generator=gens())
    theirs = published_sde_step(scheduler, v, t, x, generator=gens())
    _close(ours, theirs, "sde")


def test_bf16_inputs(scheduler, seed):
    """bf16 inputs compute in float32 (exact upcast, like Flow-GRPO's .float()); a sampled x' stays bf16."""
    B = 2
    v, x = _inputs(B, torch.bfloat16)
    t = scheduler.timesteps[[2, 5]]
    x_next = torch.randn(B, *SHAPE).to(torch.bfloat16)
    ours = sde_step_with_logprob(scheduler, v, t, x, prev_sample=x_next)
    theirs = published_sde_step(scheduler, v, t, x, prev_sample=x_next)
    _close((ours[0].float(),) + tuple(ours[1:]), theirs, "sde")
    rolled = sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(seed))
    assert rolled[0].dtype == torch.bfloat16 and rolled[1].dtype == torch.float32
    assert rolled[2].dtype == torch.float32


def test_return_sqrt_dt(scheduler):
    v, x = _inputs(2)
    t = scheduler.timesteps[[0, 4]]
    out = sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(0), return_sqrt_dt=True)
    assert len(out) == 5
    want = torch.sqrt(scheduler.sigmas[[0, 4]].double() - scheduler.sigmas[[1, 5]].double())
    torch.testing.assert_close(out[4].flatten().double(), want, rtol=1e-6, atol=0)


def test_bad_arguments(scheduler):
    v, x = _inputs(2)
    t = scheduler.timesteps[[0, 1]]
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(scheduler, v, t, x, sde_type="ode")
    with pytest.raises(TypeError, match="noise_level"):
        sde_step_with_logprob(scheduler, v, t, x, x)  # prev_sample passed positionally into noise_level's slot
    with pytest.raises(ValueError, match="timestep"):
        sde_step_with_logprob(scheduler, v, scheduler.timesteps[:3], x)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_every_backend(scheduler, bk, sde_type, seed):
    """The drop-in runs on whichever grpo_guard backend is chosen, with the same results."""
    name, device = bk
    B = 3
    v, x = (t.to(device) for t in _inputs(B))
    t = scheduler.timesteps[[0, 5, 8]]
    ours = sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(seed), sde_type=sde_type)
    assert gg.last_backend() == name
    theirs = published_sde_step(scheduler, v.cpu(), t, x.cpu(), generator=torch.Generator().manual_seed(seed),
                                sde_type=sde_type)
    _close(tuple(o.cpu() for o in ours), theirs, sde_type)
    x_next = theirs[0].to(device)
    scored = sde_step_with_logprob(scheduler, v, t, x, prev_sample=x_next, sde_type=sde_type)
    _close((scored[0].cpu(),) + tuple(o.cpu() for o in scored[1:]),
           published_sde_step(scheduler, v.cpu(), t, x.cpu(), prev_sample=x_next.cpu(), sde_type=sde_type), sde_type)
