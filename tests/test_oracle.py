"""The reference and every backend against the independent float64 oracle (tests/_oracle.py): loss, gradient and
stats of every method, dynamics, old input and guard weight, in a case built to expose the clip bounds, the
advantage clamp and the weights:

- log-ratios at 0.5, -0.9, 1.1, -1.5, 2.0 and -0.3 times the clip range eps, with advantages 1, -1, 2.5, -7, 6 and
  0.5: sample 2 (A > 0) sits just above 1 + eps, so an upper bound moved to 1 + 1.2 eps unclips it; samples 3
  and 4 have |A| > adv_clip_max = 5, so a missing clamp changes their terms; 1/|dt| and beta/|dt| differ by beta;
- per-sample sigmas (every sample its own step), float64 inputs, tolerances at float64 rounding.
Also log p of sde_step against the Normal log-density (flow, dance) and -mean (x'-mu)^2 (cps).
"""
import pytest
import torch

import grpo_guard as gg
from grpo_guard import reference as ref

import _oracle as O
from _cases import latents
from _backends import KERNEL_SET_BACKENDS, OTHER_KERNEL_SET, select_kernel_set

METHOD_KINDS = [("grpo", "old_log_prob"), ("grpo", "old_model_output"), ("grpo", "old_prev_sample_mean"),
                ("mean_revised", "old_model_output"), ("mean_revised", "old_prev_sample_mean"),
                ("ratio_norm", "old_model_output"), ("ratio_norm", "old_prev_sample_mean"),
                ("guard", "old_model_output"), ("guard", "old_prev_sample_mean")]
TARGETS = torch.tensor([0.5, -0.9, 1.1, -1.5, 2.0, -0.3], dtype=torch.float64)  # log-ratios / eps
ADVANTAGES = torch.tensor([1.0, -1.0, 2.5, -7.0, 6.0, 0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.96, 0.85, 0.7, 0.55, 0.4, 0.25], dtype=torch.float64)
SIGMA_NEXT = SIGMA - torch.tensor([0.04, 0.1, 0.12, 0.1, 0.15, 0.1], dtype=torch.float64)


@pytest.fixture(params=["split", "fused"])
def kernel_set(request, monkeypatch):
    """Both kernel sets of the triton and cuda backends (the torch backend ignores it)."""
    select_kernel_set(monkeypatch, request.param == "fused")
    return request.param


def clipped_case(method, kind, dynamics, seed, D=64):
    """(kwargs for gg/ref.policy_loss in float64, oracle kwargs, eps): a policy change whose log-ratios under
    ``method`` sit at TARGETS * eps."""
    g = torch.Generator().manual_seed(seed)
    B = len(TARGETS)
    v_old = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    _, s, mean_fn = O.schedule_terms(SIGMA, SIGMA_NEXT, 0.7, dynamics)
    mu_old = mean_fn(x, v_old)
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    xp = mu_old + s * z
    old_lp = O.log_prob(xp, mu_old, s, dynamics)
    direction = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.5 * z  # correlated with z: every
    # log-ratio has a clear linear term, so each target is reached near 0
    olds = {"old_model_output": dict(v_old=v_old), "old_prev_sample_mean": dict(mu_old=mu_old),
            "old_log_prob": dict(old_log_prob=old_lp)}[kind]

    def log_ratio(scale):
        v = v_old + direction * scale.reshape(-1, 1)
        return O.policy_loss(v, x, xp, SIGMA, SIGMA_NEXT, ADVANTAGES, dynamics=dynamics, method=method,
                             clip_range=1.0, **olds)[1]["log_ratio"]

    # mu is linear in v, so every log-ratio is a t - b t^2 in the scale t (b = 0 but for grpo): fit a, b from two
    # scales and take the root nearer 0
    u = torch.full((B,), 1e-3, dtype=torch.float64)
    f1, f2 = log_ratio(u) / u, log_ratio(2 * u) / (2 * u)
    b = (f1 - f2) / u
    a = f1 + b * u
    target = TARGETS * 1e-5
    disc = a * a - 4 * b * target
    assert (disc > 0).all(), "target log-ratio out of reach"
    scale = torch.where(b.abs() * target.abs() < 1e-12 * a * a, target / a, (a - a.sign() * disc.sqrt()) / (2 * b))
    v = v_old + direction * scale.reshape(-1, 1)
    lr = log_ratio(scale)
    eps = lr[2].item() / 1.1
    assert eps > 0 and ((lr / eps - TARGETS).abs() < 0.02).all(), lr / eps
    gg_old = {"old_model_output": {"old_model_output": v_old}, "old_prev_sample_mean": {"old_prev_sample_mean": mu_old},
              "old_log_prob": {"old_log_prob": old_lp}}[kind]
    return dict(model_output=v, sample=x, prev_sample=xp, **gg_old), olds, eps


def compare(got_loss, got_stats, got_grad, want_loss, want_stats, want_grad):
    torch.testing.assert_close(got_loss.double().cpu(), want_loss.detach(), rtol=1e-9, atol=1e-12)
    for k in ("ratio_mean", "ratio_std", "clipfrac", "approx_kl", "log_ratio"):
        torch.testing.assert_close(got_stats[k].double().cpu(), want_stats[k], rtol=1e-9, atol=1e-14, msg=k)
    torch.testing.assert_close(got_grad.double().cpu(), want_grad, rtol=1e-8,
                               atol=1e-10 * want_grad.abs().max().item())


def run_oracle(case, olds, eps, **kw):
    v = case["model_output"].clone().requires_grad_(True)
    loss, stats = O.policy_loss(v, case["sample"], case["prev_sample"], SIGMA, SIGMA_NEXT, ADVANTAGES, clip_range=eps,
                                **olds, **kw)
    loss.backward()
    return loss, stats, v.grad


@pytest.mark.parametrize("dynamics", ["flow", "dance", "cps"])
@pytest.mark.parametrize("method, kind", METHOD_KINDS)
@pytest.mark.parametrize("guard_weight", ["dt", "beta_dt"])
def test_reference_matches_the_oracle(dynamics, method, kind, guard_weight, seed):
    if guard_weight == "beta_dt" and method != "guard":
        pytest.skip("the weight applies to method='guard' only")
    case, olds, eps = clipped_case(method, kind, dynamics, seed)
    kw = dict(dynamics=dynamics, method=method, guard_weight=guard_weight)
    want = run_oracle(case, olds, eps, **kw)
    assert want[1]["clipfrac"].item() == 3 / 6  # samples 2, 3 and 4 are outside [1 - eps, 1 + eps]
    v = case.pop("model_output").clone().requires_grad_(True)
    loss, stats = ref.policy_loss(v, sigma=SIGMA, sigma_next=SIGMA_NEXT, advantages=ADVANTAGES, clip_range=eps,
                                  adv_clip_max=5.0, **case, **kw)
    loss.backward()
    compare(loss, stats, v.grad, *want)


@pytest.mark.parametrize("dynamics", ["flow", "dance", "cps"])
@pytest.mark.parametrize("method, kind", METHOD_KINDS)
def test_every_backend_matches_the_oracle(bk, kernel_set, dynamics, method, kind, seed):
    name, device = bk
    if name not in KERNEL_SET_BACKENDS and kernel_set == "fused":
        pytest.skip(OTHER_KERNEL_SET)
    for gw in (("dt", "beta_dt") if method == "guard" else ("dt",)):
        case, olds, eps = clipped_case(method, kind, dynamics, seed)
        kw = dict(dynamics=dynamics, method=method, guard_weight=gw)
        want = run_oracle(case, olds, eps, **kw)
        case = {k: t.to(device) for k, t in case.items()}
        v = case.pop("model_output").clone().requires_grad_(True)
        loss, stats = gg.policy_loss(v, sigma=SIGMA.to(device), sigma_next=SIGMA_NEXT.to(device),
                                     advantages=ADVANTAGES.to(device), clip_range=eps, adv_clip_max=5.0, **case, **kw)
        assert gg.last_backend() == name
        loss.backward()
        compare(loss, stats, v.grad, *want)


@pytest.mark.parametrize("dynamics", ["flow", "dance", "cps"])
def test_sde_step_log_prob_is_the_direct_log_density(bk, kernel_set, dynamics, seed):
    name, device = bk
    if name not in KERNEL_SET_BACKENDS and kernel_set == "fused":
        pytest.skip(OTHER_KERNEL_SET)
    v, x = latents(6, (4, 16), torch.float64, device)
    noise = torch.randn(x.shape, dtype=torch.float64, device=device)
    out = gg.sde_step(v, x, SIGMA.to(device), SIGMA_NEXT.to(device), dynamics=dynamics, noise=noise)
    _, s, mean_fn = O.schedule_terms(SIGMA, SIGMA_NEXT, 0.7, dynamics)
    mu = mean_fn(O.flat64(x), O.flat64(v))
    torch.testing.assert_close(O.flat64(out.prev_sample_mean), mu, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(O.flat64(out.prev_sample), mu + s * O.flat64(noise), rtol=1e-12, atol=1e-13)
    want = O.log_prob(O.flat64(out.prev_sample), mu, s, dynamics)
    torch.testing.assert_close(out.log_prob.cpu(), want, rtol=1e-12, atol=1e-12)
