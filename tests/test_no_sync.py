"""No host-device synchronization on the default path (issue 9): sde_step (rollout and scoring, forward and
backward), policy_loss (every old input, forward and backward) and group_advantages, with per-sample values in
device tensors and the default ``validate=True``. Bad values still fail loudly: NaN outputs, and
``grpo_guard.check_errors()`` names the op and the argument; ``validate="sync"`` raises at once.

On CPU a dispatch mode records the ops that would synchronize a GPU (``aten._local_scalar_dense`` for ``.item()``
/ ``bool()``, ``nonzero``, ``unique``, copies to the host, ...), with the Triton interpreter's own host work
hidden; on a GPU ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronization raise. The torch-op checks
(torch and cuda backends) run both ways on a CPU: as on a GPU, and with the CPU's host reads (``host_reads``).
"""
import warnings

import pytest
import torch

import grpo_guard as gg
from grpo_guard.ops import errors

from _backends import KERNEL_SET_BACKENDS, OTHER_KERNEL_SET, select_kernel_set
from _cases import latents
from _host_work import OpLog, cuda_sync_errors, hide_kernel_host_work

DYNAMICS = ("flow", "dance", "cps")


@pytest.fixture(params=["split", "fused"])
def kernels(request, monkeypatch):
    """The kernel set of the triton and cuda backends; the Triton interpreter's host work hidden from the log."""
    select_kernel_set(monkeypatch, request.param == "fused")
    try:
        from grpo_guard.kernels import policy_loss as PL
        from grpo_guard.kernels import sde_step as SDE
    except Exception:  # noqa: BLE001  (no triton: only the torch/cuda backends run)
        yield request.param
        return
    hide_kernel_host_work(monkeypatch, (SDE, PL))
    yield request.param


@pytest.fixture(autouse=True, params=["device", "host"])
def host_reads(request, bk, monkeypatch):
    """How the torch-op checks (torch and cuda backends) take CPU tensors. "device": with torch ops, the path a GPU
    takes (the one the no-sync log must see). "host": the CPU default (errors.HOST_READS_ON_CPU): values read in
    place, the torch ops only when one fails; the same NaNs and error bits are expected."""
    if request.param == "host" and (bk[1].type != "cpu" or bk[0] == "triton"):
        pytest.skip("host reads are the CPU's torch-op checks (the Triton kernels check in the launch)")
    monkeypatch.setattr(errors, "HOST_READS_ON_CPU", request.param == "host")
    return request.param


@pytest.fixture(autouse=True)
def _clean_error_word():
    for w in errors._WORDS.values():
        w.zero_()
    yield
    for w in errors._WORDS.values():
        w.zero_()


def schedule(B, device):
    sig = torch.linspace(0.9, 0.4, B, dtype=torch.float64, device=device)
    return sig, sig - 0.1


def _skip_kernel_set_for_other_backends(bk, kernels):
    if bk[0] not in KERNEL_SET_BACKENDS and kernels == "fused":
        pytest.skip(OTHER_KERNEL_SET)


@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_default_path_does_not_synchronize(bk, kernels, dynamics, seed):
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    B = 3
    v_old, x = latents(B, (4, 16), torch.bfloat16, device)
    sig, nxt = schedule(B, device)
    noise = torch.randn(x.shape, device=device)
    adv = torch.randn(B, device=device)
    rewards, ids = torch.randn(6, device=device), torch.tensor([3, 1, 3, 1, 2, 2], device=device)
    roll = gg.sde_step(v_old, x, sig, nxt, dynamics=dynamics, noise=noise)  # warm-up: caches, compiled kernels
    with cuda_sync_errors(device), OpLog() as log:
        roll = gg.sde_step(v_old, x, sig, nxt, dynamics=dynamics, noise=noise)
        v = v_old.detach().clone().requires_grad_(True)
        scored = gg.sde_step(v, x, sig, nxt, dynamics=dynamics, prev_sample=roll.prev_sample)
        scored.log_prob.sum().backward()
        for method, kind in (("guard", "old_model_output"), ("ratio_norm", "old_prev_sample_mean"),
                             ("grpo", "old_log_prob")):
            old = {"old_model_output": v_old, "old_prev_sample_mean": roll.prev_sample_mean,
                   "old_log_prob": roll.log_prob}[kind]
            v = v_old.detach().clone().requires_grad_(True)
            loss, stats = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, adv, dynamics=dynamics, method=method,
                                         **{kind: old})
            loss.backward()
        gg.group_advantages(rewards, ids)
    assert log.syncs == [], log.syncs
    gg.check_errors()  # nothing invalid was given


def test_bad_device_values_give_nan_and_a_named_error(bk, kernels, seed):
    """Out-of-range tensor sigmas, non-finite advantages / old log-probs / rewards: NaN where they enter, and
    check_errors() raises once, naming each op and argument; the error word is then clear."""
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    B = 3
    v, x = latents(B, (4, 16), torch.float32, device)
    sig, nxt = schedule(B, device)
    bad_nxt = nxt.clone()
    bad_nxt[1] = sig[1] + 0.05  # sigma_next > sigma
    with cuda_sync_errors(device):
        out = gg.sde_step(v, x, sig, bad_nxt)
    assert torch.isnan(out.log_prob[1]) and torch.isfinite(out.log_prob[[0, 2]]).all()
    with pytest.raises(gg.InvalidInputError, match="sde_step: sigma_next must be finite, >= 0 and < sigma"):
        gg.check_errors()
    gg.check_errors()  # cleared

    roll = gg.sde_step(v, x, sig, nxt)
    adv = torch.tensor([1.0, float("inf"), -1.0], device=device)
    vg = v.clone().requires_grad_(True)
    old_lp = roll.log_prob.clone()
    old_lp[0] = float("nan")  # the test's own host-to-device writes stay outside the no-sync block
    ones = torch.ones(B, device=device)
    rewards, ids = (torch.tensor([1.0, float("nan"), 2.0, 3.0], device=device),
                    torch.tensor([0, 0, 1, 1], device=device))
    with cuda_sync_errors(device):
        loss, stats = gg.policy_loss(vg, x, roll.prev_sample, sig, nxt, adv, old_model_output=v)
        loss.backward()
        loss2, _ = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, ones, method="grpo", old_log_prob=old_lp)
        adv_rewards = gg.group_advantages(rewards, ids)
    assert torch.isnan(loss) and torch.isnan(vg.grad).any()
    assert torch.isnan(loss2)
    assert torch.isnan(adv_rewards[:2]).all() and torch.isfinite(adv_rewards[2:]).all()
    with pytest.raises(gg.InvalidInputError) as info:
        gg.check_errors()
    msg = str(info.value)
    assert "policy_loss: advantages must be finite" in msg and "policy_loss: old_log_prob must be finite" in msg
    assert "group_advantages: rewards must be finite" in msg and "sde_step" not in msg


def test_cps_zero_std_is_checked_on_the_device(bk, kernels, seed):
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    B = 2
    v, x = latents(B, (4, 8), torch.float32, device)
    sig = torch.tensor([0.3, 0.2], dtype=torch.float64, device=device)
    nxt = torch.tensor([0.1, 0.0], dtype=torch.float64, device=device)
    roll = gg.sde_step(v, x, sig, torch.tensor([0.1, 0.05], dtype=torch.float64, device=device), dynamics="cps")
    loss, stats = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, torch.ones(B, device=device), dynamics="cps",
                                 method="guard", old_model_output=v)
    assert torch.isnan(loss)
    with pytest.raises(gg.InvalidInputError, match="sigma_next must be > 0 for cps"):
        gg.check_errors()


@pytest.fixture(params=[False, True], ids=["", "lean"])
def lean(request, bk, kernels, monkeypatch):
    """True: the opt-in lean single-launch Triton kernels (triton_launch.LEAN), which close the default Triton
    kernels' known gap: they make a failed row's coefficients NaN, so all its outputs are NaN as on torch/cuda."""
    if request.param:
        if bk[0] != "triton" or kernels != "fused":
            pytest.skip("the lean variant is the single-launch Triton kernels'")
        from grpo_guard.ops import triton_launch
        monkeypatch.setattr(triton_launch, "LEAN", True)
    return request.param


def test_out_of_range_sigma_is_nan_where_the_formulas_stay_finite(bk, kernels, seed, lean):
    """sigma = 1.5 with dance dynamics: every coefficient of the step is still a finite number, so only the check
    itself can make the sample NaN (a backend that skipped it would return finite garbage)."""
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    B = 3
    v, x = latents(B, (4, 16), torch.float32, device)
    sig = torch.tensor([0.9, 1.5, 0.7], dtype=torch.float64, device=device)
    nxt = torch.tensor([0.8, 0.5, 0.6], dtype=torch.float64, device=device)
    vg = v.clone().requires_grad_(True)
    roll = gg.sde_step(vg, x, sig, nxt, dynamics="dance")
    roll.log_prob.sum().backward()
    assert torch.isnan(roll.log_prob[1]) and torch.isfinite(roll.log_prob[[0, 2]]).all()
    assert torch.isfinite(roll.prev_sample[[0, 2]]).all() and torch.isfinite(vg.grad[[0, 2]]).all()
    if name != "triton" or lean:  # known gap: the default Triton kernels make a failed row's log p NaN, but not
        # its x', its mean or the gradient of its log p (finite garbage there until check_errors() raises)
        assert torch.isnan(roll.prev_sample[1]).all() and torch.isnan(roll.prev_sample_mean[1]).all()
        assert torch.isnan(vg.grad[1]).all()
    with pytest.raises(gg.InvalidInputError, match="sde_step: sigma must lie in"):
        gg.check_errors()
    vg.grad = None
    loss, stats = gg.policy_loss(vg, x, roll.prev_sample.detach().nan_to_num(), sig, nxt,
                                 torch.ones(B, device=device), dynamics="dance", old_model_output=v)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(stats["log_ratio"][1]) and torch.isnan(vg.grad[1]).all()
    assert torch.isfinite(stats["log_ratio"][[0, 2]]).all() and torch.isfinite(stats["bias"][[0, 2]]).all()
    if name != "triton" or lean:  # the same gap: the default Triton kernels leave a failed row's bias finite
        assert torch.isnan(stats["bias"][1])
    with pytest.raises(gg.InvalidInputError, match="policy_loss: sigma must lie in"):
        gg.check_errors()


def test_validate_sync_raises_at_once_and_false_checks_nothing(bk, kernels):
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    B = 3
    v, x = latents(B, (4, 16), torch.float32, device)
    sig, nxt = schedule(B, device)
    roll = gg.sde_step(v, x, sig, nxt)
    adv = torch.tensor([1.0, float("nan"), 0.0], device=device)
    with pytest.raises(ValueError, match="advantages has non-finite values"):
        gg.policy_loss(v, x, roll.prev_sample, sig, nxt, adv, old_model_output=v, validate="sync")
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        gg.sde_step(v, x, sig, sig, validate="sync")
    with pytest.raises(ValueError, match="rewards has non-finite"):
        gg.group_advantages(torch.tensor([1.0, float("inf")], device=device), [0, 0], validate="sync")
    loss, _ = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, adv, old_model_output=v, validate=False)
    assert torch.isnan(loss)  # the NaN advantage itself, not a check
    gg.check_errors()  # nothing flagged
    with pytest.raises(ValueError, match="validate must be True, False or 'sync'"):
        gg.sde_step(v, x, sig, nxt, validate="yes")


SIGMA_RULE, NEXT_RULE = "sigma must lie in", "sigma_next must be finite, >= 0 and < sigma"
CPS_RULE = "sigma_next must be > 0 for cps"
# (sigma, sigma_next of the middle sample, dynamics, method, the rules it breaks): each rule's edges, on both sides
BOUNDARIES = [
    (1.0, 0.9, "flow", "guard", ()),                      # sigma = 1 is in (0, 1]
    (1.0 + 2 ** -40, 0.9, "dance", "guard", (SIGMA_RULE,)),
    (1e-6, 0.0, "dance", "guard", ()),                    # close to 0 from above
    (0.0, 0.0, "dance", "guard", (SIGMA_RULE, NEXT_RULE)),  # sigma = 0, and sigma_next = sigma
    (0.5, 0.5, "flow", "guard", (NEXT_RULE,)),            # dt = 0
    (0.5, -0.0, "dance", "guard", ()),                    # -0.0 >= 0
    (0.5, -1e-300, "dance", "guard", (NEXT_RULE,)),
    (0.5, float("-inf"), "dance", "guard", (NEXT_RULE,)),
    (float("nan"), 0.4, "dance", "guard", (SIGMA_RULE, NEXT_RULE)),
    (0.5, 0.0, "cps", "guard", (CPS_RULE,)),              # cps divides by s = 0 ...
    (0.5, 0.0, "cps", "grpo", ()),                        # ... only where the method divides by it
]


@pytest.mark.parametrize("case", BOUNDARIES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_device_sigma_checks_at_their_edges(bk, kernels, seed, case, lean):
    """Each device-side sigma rule just inside and just outside its bound, in one sample of three: a broken rule
    makes that sample's log-ratio NaN (off-policy, so the formulas alone would give a finite number or an
    infinity), and its bias too except on the default Triton kernels (their known gap), and is named by
    check_errors(); a kept rule leaves every sample finite and the word clear."""
    _skip_kernel_set_for_other_backends(bk, kernels)
    name, device = bk
    s1, n1, dynamics, method, rules = case
    B = 3
    v, x = latents(B, (4, 16), torch.float32, device)
    sig = torch.tensor([0.8, s1, 0.6], dtype=torch.float64, device=device)
    nxt = torch.tensor([0.7, n1, 0.5], dtype=torch.float64, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    xp = x + 0.1 * torch.randn(x.shape, generator=g, device=device)
    old_v = v + 0.05 * torch.randn(v.shape, generator=g, device=device)
    with cuda_sync_errors(device):
        _, stats = gg.policy_loss(v, x, xp, sig, nxt, torch.ones(B, device=device), dynamics=dynamics,
                                  method=method, old_model_output=old_v)
    lr = stats["log_ratio"]
    assert torch.isfinite(lr[[0, 2]]).all()
    if not rules:
        assert torch.isfinite(lr[1])
        gg.check_errors()
        return
    assert torch.isnan(lr[1]), f"sample 1 broke {rules} but its log-ratio is {lr[1].item()}"
    if name != "triton" or lean:
        assert torch.isnan(stats["bias"][1]), f"sample 1 broke {rules} but its bias is {stats['bias'][1].item()}"
    with pytest.raises(gg.InvalidInputError) as info:
        gg.check_errors()
    named = str(info.value).splitlines()[1:]
    assert sorted(r for r in (SIGMA_RULE, NEXT_RULE, CPS_RULE) if any(r in line for line in named)) == \
        sorted(rules), named
    assert all(line.strip().startswith("policy_loss:") for line in named)


def test_cpu_host_reads_skip_the_check_ops_when_every_value_passes(bk, host_reads, seed):
    """On a CPU the checks read plain CPU tensors in place (numpy views) and dispatch no torch op but a detach
    when every value passes; a failing value or a dtype numpy lacks (bfloat16) takes the torch ops."""
    if host_reads != "host" or bk[0] != "torch":
        pytest.skip("the host-read test runs once")
    from grpo_guard.ops import requests
    B = 4
    v, x = latents(B, (4, 8), torch.float32, torch.device("cpu"))
    sig, nxt = schedule(B, "cpu")
    adv, olp = torch.randn(B), torch.randn(B)
    kw = dict(old_log_prob=olp, old_prev_sample_mean=None, old_model_output=v, noise_level=0.7, dynamics="cps",
              method="guard", clip_range=1e-4, adv_clip_max=5.0, guard_weight="dt", validate=True)

    def ops_of(req):
        with OpLog() as log:
            out, code = requests.checked(req)
        return out, code, log.ops

    sde = requests.sde_request(v, x, sig, nxt, noise_level=0.7, dynamics="flow", prev_sample=x, generator=None,
                               noise=None, validate=True)
    loss = requests.loss_request(v, x, x, sig, nxt, adv, **kw)
    for req in (sde, loss):
        out, code, ops = ops_of(req)
        assert out is req and code is None and set(ops) <= {"aten.detach"}, ops
    errors.HOST_READS_ON_CPU = False  # (restored by the fixture's monkeypatch) as on a GPU: torch ops
    assert "aten.where" in ops_of(sde)[2]
    errors.HOST_READS_ON_CPU = True
    bad = [("sigma", 1, 1.5), ("sigma_next", 2, 0.0), ("advantages", 0, float("inf")),
           ("old_log_prob", 3, float("nan"))]  # sigma_next = 0: the cps rule of a normalized ratio
    for name, i, value in bad:
        t = getattr(loss, name).clone()
        t[i] = value
        req = requests.loss_request(v, x, x, *(t if n == name else getattr(loss, n)
                                               for n in ("sigma", "sigma_next", "advantages")), **{
            **kw, "old_log_prob": t if name == "old_log_prob" else olp})
        out, code, ops = ops_of(req)
        assert "aten.where" in ops and int(code) != 0, name
        assert not torch.isfinite(getattr(out, "sigma" if name == "sigma_next" else name)[i]), name
    _, code, ops = ops_of(requests.loss_request(v, x, x, sig, nxt, adv.bfloat16(), **kw))
    assert "aten.where" in ops and int(code) == 0  # bfloat16: no numpy view, checked with torch ops


def test_cpu_host_reads_leave_transformed_and_fake_tensors_to_the_torch_ops(bk, host_reads):
    """errors.host_values reads only plain CPU tensors: under vmap, grad, functionalize, fake tensors or compile the
    values are not (or not yet) in the tensor's memory, so the checks take the torch ops."""
    if host_reads != "host" or bk[0] != "torch":
        pytest.skip("the host-read test runs once")
    plain = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert errors.host_values({"s": plain})["s"].tolist() == [0.5, 0.25]
    seen = []

    def probe(t):
        seen.append(errors.host_values({"s": t}))
        return t * 2

    torch.vmap(probe)(plain.reshape(2, 1))
    torch.func.functionalize(probe)(plain)
    torch.func.grad(lambda t: probe(t).sum())(plain)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        probe(mode.from_tensor(plain))
    torch.compile(probe, backend="eager", fullgraph=True)(plain)
    from torch.fx.experimental.proxy_tensor import make_fx
    make_fx(probe)(plain)  # real tensors, but a graph is recorded: a host decision would be baked into it
    with warnings.catch_warnings():  # (deprecated in recent torch, still used)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(probe, plain, check_trace=False)
    assert seen == [None] * 7

    class Sub(torch.Tensor):  # a subclass may define its own values (__torch_function__): not read on the host
        pass

    assert errors.host_values({"s": plain.as_subclass(Sub)}) is None
    assert errors.host_values({"s": plain.bfloat16()}) is None and errors.host_values({"s": plain.to("meta")}) is None
