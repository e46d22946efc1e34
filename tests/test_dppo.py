"""Flow-DPPO (method="dppo", SPEC §9) on every backend (Triton: both kernel sets) against an oracle written
independently of reference.py (tests/_oracle.py: direct log-densities and torch.distributions' KL), in a case whose
samples straddle the KL threshold with both signs of A log r; on-policy it is plain Flow-GRPO with the ratio
exactly 1; bad input is refused."""
import pytest
import torch

import _oracle as O

import grpo_guard as gg
from grpo_guard import reference as ref
from _backends import KERNEL_SET_BACKENDS, OTHER_KERNEL_SET, select_kernel_set

DYNAMICS = ["flow", "dance", "cps"]
B = 8


@pytest.fixture(params=["fused", "split"])
def kb(request, bk, monkeypatch):
    """(backend, device) as ``bk``; the triton and cuda backends once per kernel set (Triton: single-launch and
    split forward; CUDA: vector and strided layout)."""
    name, device = bk
    if name not in KERNEL_SET_BACKENDS and request.param == "split":
        pytest.skip(OTHER_KERNEL_SET)
    select_kernel_set(monkeypatch, request.param == "fused")
    return name, device


def on(c, device):
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in c.items()}


def case(dynamics, seed, dtype=torch.float64):
    """Latents with per-sample policy moves of sizes spread over two decades (K over four); tau between the middle
    two K, so half the samples are above it; advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    nxt = sig - 0.1
    x = torch.randn(B, 4, 16, generator=g, dtype=torch.float64)
    v_old = torch.randn(B, 4, 16, generator=g, dtype=torch.float64)
    roll = ref.sde_step(v_old, x, sig, nxt, dynamics=dynamics, noise=torch.randn(B, 4, 16, generator=g,
                                                                                  dtype=torch.float64))
    scale = torch.logspace(-4, -2, B, dtype=torch.float64)[torch.randperm(B, generator=g)]
    v = v_old + scale.reshape(-1, 1, 1) * torch.randn(B, 4, 16, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 2.0, -1.2, 0.4, -2.5, 0.9, -0.3], dtype=torch.float64)
    st = O.dppo_loss(v, x, roll.prev_sample, sig, nxt, adv, v_old=v_old, dynamics=dynamics, kl_threshold=1.0)[1]
    K, lr = st["kl"], st["log_ratio"]
    order = K.argsort()
    tau = float((K[order[B // 2 - 1]] * K[order[B // 2]]).sqrt())  # between two samples' K, not on one
    # above tau: two samples move away from the old policy (A log r > 0: dropped), two back towards it (kept)
    for j, i in enumerate(order[B // 2:].tolist()):
        adv[i] = adv[i].abs() * (lr[i].sign() if j % 2 == 0 else -lr[i].sign())
    c = dict(v=v.to(dtype), x=x.to(dtype), xp=roll.prev_sample.to(dtype), v_old=v_old.to(dtype),
             mu_old=roll.prev_sample_mean.to(dtype), sig=sig, nxt=nxt, adv=adv.float())
    return c, tau


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("kind", ["old_model_output", "old_prev_sample_mean"])
def test_matches_the_oracle(kb, dynamics, kind, seed):
    """float64: loss, gradient, log-ratios, mask and stats as the oracle's (the reference, and the kernels, which
    must decide the same mask)."""
    name, device = kb
    c, tau = case(dynamics, seed)
    v = c["v"].clone().requires_grad_(True)
    old = {"old_model_output": {"v_old": c["v_old"]}, "old_prev_sample_mean": {"mu_old": c["mu_old"]}}[kind]
    want_loss, want = O.dppo_loss(v, c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], dynamics=dynamics,
                                  kl_threshold=tau, **old)
    want_loss.backward()
    want_grad = v.grad.clone()
    # the case exposes both gates: some samples above tau kept (moving back to the old policy), some dropped
    above = want["kl"] >= tau
    assert want["drop"].any() and (above & ~want["drop"]).any() and not want["drop"][~above].any()
    d = on(c, device)
    v = d["v"].clone().requires_grad_(True)
    gg_old = {"old_model_output": {"old_model_output": d["v_old"]},
              "old_prev_sample_mean": {"old_prev_sample_mean": d["mu_old"]}}[kind]
    loss, stats = gg.policy_loss(v, d["x"], d["xp"], d["sig"], d["nxt"], d["adv"], dynamics=dynamics,
                                 method="dppo", kl_threshold=tau, **gg_old)
    assert gg.last_backend() == name
    loss.backward()
    torch.testing.assert_close(loss.cpu(), want_loss.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v.grad.cpu(), want_grad, rtol=1e-8, atol=1e-10 * want_grad.abs().max().item())
    for k in ("kl_mean", "kl_max", "masked_fraction", "masked_fraction_pos", "masked_fraction_neg", "log_ratio"):
        torch.testing.assert_close(stats[k].cpu(), want[k], rtol=1e-9, atol=1e-14, msg=k)
    assert stats["clipfrac"] == stats["masked_fraction"]
    assert set(stats) == set(ref.policy_loss(c["v"], c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], method="dppo",
                                             dynamics=dynamics, old_model_output=c["v_old"])[1])


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_inputs_match_the_oracle_on_the_same_inputs(kb, dynamics, dtype, seed):
    """float32 / bf16 latents: loss, mask and stats as the float64 oracle gives for the same (rounded) inputs; the
    mask is decided on the log-ratio computed in float32 (bf16 inputs are upcast)."""
    name, device = kb
    c, tau = case(dynamics, seed, dtype)
    d = on(c, device)
    loss, stats = gg.policy_loss(d["v"], d["x"], d["xp"], d["sig"], d["nxt"], d["adv"], dynamics=dynamics,
                                 method="dppo", kl_threshold=tau, old_model_output=d["v_old"])
    loss, stats = loss.cpu(), {k: t.cpu() for k, t in stats.items()}
    want_loss, want = O.dppo_loss(c["v"], c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], v_old=c["v_old"],
                                  dynamics=dynamics, kl_threshold=tau)
    assert loss.dtype == torch.float32
    near = ((want["kl"] - tau).abs() < 1e-4 * tau) | (want["log_ratio"].abs() < 1e-5)
    assert ((stats["masked_fraction"] * B - want["masked_fraction"] * B).abs() <= near.sum())
    torch.testing.assert_close(stats["kl_mean"].double(), want["kl_mean"], rtol=2e-4, atol=0)
    if not near.any():
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_gradcheck_float64(kb, dynamics, seed):
    """Numerical vs analytical gradient w.r.t. the first 3 elements of every sample (kept and dropped samples, both
    signs of A; the rest of v fixed: 24 inputs, so that the interpreted kernels stay quick)."""
    c, tau = case(dynamics, seed)
    c = on(c, kb[1])

    def f(head):
        v_ = torch.cat([head, c["v"].reshape(B, -1)[:, 3:]], dim=1).reshape(c["v"].shape)
        return gg.policy_loss(v_, c["x"], c["xp"], c["sig"], c["nxt"], c["adv"].double(), dynamics=dynamics,
                              method="dppo", kl_threshold=tau, old_model_output=c["v_old"])[0]
    head = c["v"].reshape(B, -1)[:, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (head,), eps=1e-9, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_policy_it_is_plain_flow_grpo_with_ratio_exactly_one(kb, dynamics, dtype, seed):
    c, _ = case(dynamics, seed, dtype)
    c = on(c, kb[1])
    out = {}
    for method in ("dppo", "grpo"):
        v = c["v_old"].clone().requires_grad_(True)
        loss, stats = gg.policy_loss(v, c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], dynamics=dynamics,
                                     method=method, old_model_output=c["v_old"], kl_threshold=1e-12)
        loss.backward()
        out[method] = (loss, v.grad, stats)
    loss, grad, stats = out["dppo"]
    assert stats["ratio_mean"] == 1.0 and stats["ratio_std"] == 0.0 and stats["kl_max"] == 0.0
    assert stats["masked_fraction"] == 0.0
    assert torch.equal(loss, out["grpo"][0])  # bit for bit the same kernels' Flow-GRPO
    torch.testing.assert_close(loss, -c["adv"].mean(), rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(grad, out["grpo"][1], rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(kl_threshold=0.0), r"kl_threshold must be a positive finite number"),
    (dict(kl_threshold=float("inf")), r"kl_threshold must be a positive finite number"),
    (dict(kl_threshold=float("nan")), r"kl_threshold must be a positive finite number"),
    (dict(method="dpo"), r"method must be one of"),
])
def test_bad_arguments(kw, match):
    c, _ = case("flow", 0, torch.float32)
    with pytest.raises(ValueError, match=match):
        gg.policy_loss(c["v"], c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], old_model_output=c["v_old"],
                       **{"method": "dppo", **kw})


def test_dppo_needs_an_old_mean():
    c, _ = case("flow", 0, torch.float32)
    lp = ref.sde_step(c["v_old"], c["x"], c["sig"], c["nxt"], prev_sample=c["xp"]).log_prob
    with pytest.raises(ValueError, match=r"old_log_prob alone does not give the KL"):
        gg.policy_loss(c["v"], c["x"], c["xp"], c["sig"], c["nxt"], c["adv"], old_log_prob=lp, method="dppo")
