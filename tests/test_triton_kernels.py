"""Properties of the Triton backend that the cross-backend tests (test_sde_step, test_policy_loss) do not see.

Launch counts and host-side torch work; the fixed-order chunked sums (on-policy exactness and agreement with the
reference when a sample spans several programs and loop iterations, with a masked tail); batch invariance;
float sigmas equal to tensor sigmas bit for bit (float64 scalars must reach the kernels unrounded); low-precision
prev_sample rounded like torch; non-contiguous inputs; geometry; unsupported_reason; the single-launch kernels'
results independent of the order their programs run in. Runs on CUDA tensors when a
GPU is present, else on CPU under the interpreter (conftest sets TRITON_INTERPRET=1).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import grpo_guard as gg  # noqa: E402
from grpo_guard import dispatch  # noqa: E402
from grpo_guard import reference as ref  # noqa: E402
from grpo_guard.ops import errors, requests  # noqa: E402

from _cases import latents  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = dispatch.unsupported_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton on {DEVICE}: {_REASON}")

if _REASON is None:
    from grpo_guard.kernels import policy_loss as PL_K
    from grpo_guard.kernels import sde_step as SDE_K
    from grpo_guard.ops import triton_backend as tb
    from grpo_guard.ops import triton_launch

METHODS = [m for m in ref.METHODS if m != "dppo"]  # dppo runs on the torch backend (test_dppo.py)
DYNAMICS = list(ref.DYNAMICS)


@pytest.fixture(autouse=True, params=["split", "fused"])
def _triton(request, monkeypatch):
    """Every test on both kernel sets: the split forward (reduce + finish) and the single-launch one."""
    monkeypatch.setattr(triton_launch, "FUSED", request.param == "fused")
    with gg.backend("triton"):
        yield


@pytest.fixture
def small_chunks(monkeypatch):
    """Geometry with 64-element blocks and at most 3 partials per sample. Split kernels: D = 1000 takes 3
    programs of 6 loop iterations each, the last ones masked. Single-launch kernels: 2 programs of 8 blocks
    (ITERS, a power of 2), the last 3 blocks masked, and the batch finish in tiles of 2 rows (several tiles
    for B > 2, the last partial when B is odd)."""
    monkeypatch.setattr(triton_launch, "INTERPRETED_BLOCK", 64)
    monkeypatch.setattr(triton_launch, "COMPILED_BLOCK", 64)
    monkeypatch.setattr(triton_launch, "MAX_CHUNKS", 3)
    monkeypatch.setattr(triton_launch, "FUSED_BLOCK_MIN", 64)
    monkeypatch.setattr(triton_launch, "FUSED_BLOCK_MAX", 64)
    monkeypatch.setattr(triton_launch, "FUSED_MAX_CHUNKS", 3)
    monkeypatch.setattr(triton_launch, "FINISH_ROWS_MAX", 2)
    g = triton_launch.geometry(4, 1000)
    assert (g.block, g.iters, g.chunks) == (64, 6, 3)
    f = triton_launch.fused_geometry(1000)
    assert (f.block, f.iters, f.chunks) == (64, 8, 2) and triton_launch.finish_rows(5) == (2, 1)


def sigmas(B):
    sig = torch.linspace(0.96, 0.3, B, dtype=torch.float64, device=DEVICE)
    return sig, sig - torch.linspace(0.04, 0.12, B, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_chunked_sums_match_reference_and_stay_exact_on_policy(small_chunks, dtype, dynamics, seed):
    B = 5
    v, x = latents(B, (10, 100), dtype, DEVICE)
    sig, nxt = sigmas(B)
    roll = gg.sde_step(v, x, sig, nxt, dynamics=dynamics)
    want = ref.sde_step(v.double(), x.double(), sig, nxt, dynamics=dynamics, prev_sample=roll.prev_sample.double())
    torch.testing.assert_close(roll.log_prob.double(), want.log_prob, rtol=1e-6, atol=1e-6)
    for method in METHODS:
        olds = [{"old_prev_sample_mean": roll.prev_sample_mean}, {"old_model_output": v}]
        if method == "grpo":
            olds.append({"old_log_prob": roll.log_prob})
        for old in olds:
            _, st = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, torch.randn(B, device=DEVICE),
                                   dynamics=dynamics, method=method, **old)
            assert torch.equal(st["log_ratio"], torch.zeros_like(st["log_ratio"])), (method, list(old))


@pytest.mark.parametrize("kind", ["old_model_output", "old_prev_sample_mean", "old_log_prob"])
def test_chunked_loss_and_gradient_match_reference_float64(small_chunks, kind, seed):
    B = 3
    v_old, x = latents(B, (1000,), torch.float64, DEVICE)
    roll = ref.sde_step(v_old, x, 0.7, 0.6, noise=torch.randn(x.shape, dtype=torch.float64, device=DEVICE))
    v = v_old + 1e-4 * torch.randn_like(v_old)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=DEVICE)
    old = {"old_model_output": v_old, "old_prev_sample_mean": roll.prev_sample_mean,
           "old_log_prob": roll.log_prob}
    method = "grpo" if kind == "old_log_prob" else "guard"
    out = []
    for fn in (gg.policy_loss, ref.policy_loss):
        vg = v.clone().requires_grad_(True)
        loss, st = fn(vg, x, roll.prev_sample, 0.7, 0.6, adv, method=method, clip_range=0.1, **{kind: old[kind]})
        loss.backward()
        out.append((loss.detach(), st["log_ratio"], vg.grad))
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)


def test_batch_invariance(small_chunks, seed):
    """A sample's log-prob and log-ratio do not depend on the batch around it (the chunking depends on D only)."""
    B = 5
    v, x = latents(B, (1000,), torch.float32, DEVICE)
    roll = gg.sde_step(v, x, 0.8, 0.7)
    v_new = v + 1e-3 * torch.randn_like(v)
    _, st = gg.policy_loss(v_new, x, roll.prev_sample, 0.8, 0.7, torch.ones(B, device=DEVICE), method="grpo",
                           old_log_prob=roll.log_prob)
    for i in (0, 3):
        one = gg.sde_step(v[i:i + 1], x[i:i + 1], 0.8, 0.7, prev_sample=roll.prev_sample[i:i + 1])
        assert torch.equal(one.log_prob, roll.log_prob[i:i + 1])
        _, st1 = gg.policy_loss(v_new[i:i + 1], x[i:i + 1], roll.prev_sample[i:i + 1], 0.8, 0.7,
                                torch.ones(1, device=DEVICE), method="grpo", old_log_prob=roll.log_prob[i:i + 1])
        assert torch.equal(st1["log_ratio"], st["log_ratio"][i:i + 1])


def test_repeated_calls_are_bitwise_identical(seed):
    """Results do not depend on which program finishes a row or the batch (fixed-order sums), and the arrival
    counters are left at zero (every later call finishes correctly): ten calls, identical bits. On a GPU the
    programs of a launch really race; D = 65536 gives 64 programs per sample."""
    B, D = (9, 65536) if DEVICE.type == "cuda" else (5, 300)
    v_old, x = latents(B, (D,), torch.bfloat16, DEVICE)
    sig, nxt = sigmas(B)
    roll = gg.sde_step(v_old, x, sig, nxt)
    v = (v_old.float() + 1e-3 * torch.randn(v_old.shape, device=DEVICE)).bfloat16()
    adv = torch.randn(B, device=DEVICE)
    results = []
    for _ in range(10):
        vg = v.clone().requires_grad_(True)
        loss, st = gg.policy_loss(vg, x, roll.prev_sample, sig, nxt, adv, old_model_output=v_old, clip_range=1e-3)
        loss.backward()
        lp = gg.sde_step(v_old, x, sig, nxt, prev_sample=roll.prev_sample).log_prob
        results.append([loss, vg.grad, lp] + [st[k] for k in sorted(st)])
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_float_sigmas_equal_tensor_sigmas(dtype, dynamics, seed):
    """Python-float sigmas reach the kernels as float64 scalars: same bits as float64 tensors, and for float64
    inputs the mean agrees with the reference's to float64 rounding (a float32 sigma would be off by ~1e-8)."""
    B = 3
    v, x = latents(B, (4, 9), dtype, DEVICE)
    noise = torch.randn(x.shape, dtype=ref.compute_dtype(x), device=DEVICE)
    s, n = 0.7071067811865476, 0.5772156649015329
    a = gg.sde_step(v, x, s, n, dynamics=dynamics, noise=noise)
    t = torch.full((B,), s, dtype=torch.float64, device=DEVICE), torch.full((B,), n, dtype=torch.float64, device=DEVICE)
    b = gg.sde_step(v, x, *t, dynamics=dynamics, noise=noise)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    if dtype == torch.float64:
        want = ref.sde_step(v, x, s, n, dynamics=dynamics, noise=noise)
        torch.testing.assert_close(a.prev_sample_mean, want.prev_sample_mean, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(a.std_dev_t, want.std_dev_t, rtol=1e-15, atol=0)
    v_new = v + 1e-3 * torch.randn_like(v)
    adv = torch.randn(B, device=DEVICE, dtype=dtype)
    la, sa = gg.policy_loss(v_new, x, a.prev_sample, s, n, adv, dynamics=dynamics, method="guard",
                            clip_range=1e-3, old_model_output=v)
    lb, sb = gg.policy_loss(v_new, x, a.prev_sample, *t, adv, dynamics=dynamics, method="guard",
                            clip_range=1e-3, old_model_output=v)
    assert torch.equal(la, lb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_prev_sample_rounds_like_torch(dtype, seed):
    """x' = mu + s z is formed in float32 exactly as the reference forms it (no FMA contraction) and rounded to
    nearest-even, so the stored latent is bit-identical to torch's (the interpreter alone would truncate bf16)."""
    v, x = latents(4, (16, 33), dtype, DEVICE)
    noise = torch.randn(x.shape, device=DEVICE)
    got = gg.sde_step(v, x, 0.6, 0.45, noise=noise)
    want = ref.sde_step(v, x, 0.6, 0.45, noise=noise)
    assert torch.equal(got.prev_sample, want.prev_sample)
    assert torch.equal(got.prev_sample_mean, want.prev_sample_mean)


def test_non_contiguous_inputs(seed):
    B = 3
    v, x = latents(B, (6, 10), torch.float32, DEVICE)
    vt, xt = v.transpose(1, 2).contiguous().transpose(1, 2), x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not vt.is_contiguous() and torch.equal(vt, v)
    noise = torch.randn(x.shape, device=DEVICE)
    a, b = gg.sde_step(v, x, 0.6, 0.5, noise=noise), gg.sde_step(vt, xt, 0.6, 0.5, noise=noise)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    v_new = v + 1e-3 * torch.randn_like(v)
    grads = []
    for vv, xx, old in ((v_new, x, v), (v_new.transpose(1, 2).contiguous().transpose(1, 2), xt, vt)):
        vg = vv.detach().clone().requires_grad_(True) if vv.is_contiguous() else vv.detach().requires_grad_(True)
        loss, _ = gg.policy_loss(vg, xx, a.prev_sample, 0.6, 0.5, torch.ones(B, device=DEVICE), clip_range=1e-2,
                                 old_model_output=old)
        loss.backward()
        grads.append((loss, vg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("kind", ["old_model_output", "old_prev_sample_mean", "old_log_prob"])
def test_batch_strided_inputs_are_not_copied(monkeypatch, kind, seed):
    """Latents sliced from a trajectory tensor (``latents[:, k]`` of (B, T, C, L): a batch stride of T*C*L, each
    sample contiguous) give the bits of contiguous inputs, and the wrappers copy nothing: only torch.empty and
    views, for the rollout, the scoring forward + backward and the policy loss + backward (with the default
    validation: the kernels check the per-sample values themselves)."""
    B, T = 3, 4
    traj_v, traj_x = latents(B, (T, 5, 40), torch.bfloat16, DEVICE)
    sig, nxt = sigmas(B)
    v, x, xp = traj_v[:, 1], traj_x[:, 1], traj_x[:, 2]
    noise = torch.randn(B, T, 5, 40, device=DEVICE)[:, 3]
    assert not v.is_contiguous() and triton_launch.samples_contiguous(v)
    roll = gg.sde_step(v.contiguous(), x.contiguous(), sig, nxt, noise=noise.contiguous())
    mean_traj = torch.zeros(B, T, 5, 40, device=DEVICE)
    mean_traj[:, 0] = roll.prev_sample_mean
    olds = {"old_model_output": (v, v.contiguous()), "old_prev_sample_mean": (mean_traj[:, 0], roll.prev_sample_mean),
            "old_log_prob": (roll.log_prob, roll.log_prob)}
    v_new = (v.float() + 1e-3 * torch.randn(v.shape, device=DEVICE)).bfloat16()
    adv = torch.randn(B, device=DEVICE)
    errors.word(DEVICE)  # the device's error word exists (made once per process)
    results = []
    for strided in (True, False):
        c = (lambda t: t) if strided else (lambda t: t.contiguous())
        launches = _Launches(monkeypatch)
        # the differentiated velocity too: a slice of a trajectory leaf (strided) or a contiguous leaf
        leaves = [torch.zeros(B, T, 5, 40, dtype=torch.bfloat16, device=DEVICE).index_copy_(
            1, torch.tensor([1], device=DEVICE), v_new[:, None]).requires_grad_(True) for _ in range(2)]
        vg, vl = (leaves[0][:, 1], leaves[1][:, 1]) if strided else (leaves[0][:, 1].detach().clone().requires_grad_(True),
                                                                     leaves[1][:, 1].detach().clone().requires_grad_(True))
        old = olds[kind][0 if strided else 1]
        with _torch_ops() as log:
            r = gg.sde_step(c(v), c(x), sig, nxt, noise=c(noise))
            s = gg.sde_step(vg, c(x), sig, nxt, prev_sample=c(xp))
            s.log_prob.sum().backward()
            loss, st = gg.policy_loss(vl, c(x), c(roll.prev_sample), sig, nxt, adv, clip_range=1e-2,
                                      method="grpo" if kind == "old_log_prob" else "guard", **{kind: old})
            loss.backward()
        assert launches.count > 0
        if strided:
            # the test's own log_prob.sum() and the slices' backward (autograd scatters into the leaf's gradient)
            extra = {"aten.sum", "aten.ones_like", "aten.expand", "aten.view", "aten.new_zeros", "aten.zeros",
                     "aten.select_backward", "aten.slice_scatter", "aten.select_scatter", "aten.add", "aten.copy_"}
            assert set(log.ops) <= HOST_OK | extra, sorted(set(log.ops) - HOST_OK)
        grads = (leaves[0].grad[:, 1], leaves[1].grad[:, 1]) if strided else (vg.grad, vl.grad)
        results.append([r.prev_sample, r.log_prob, r.prev_sample_mean, s.log_prob, grads[0], loss, grads[1],
                        st["log_ratio"]])
    assert all(torch.equal(p, q) for p, q in zip(*results))


class _Launches:
    """Counts kernel launches by replacing the kernels in their modules; runs them with any torch dispatch mode
    paused (the interpreter's own host copies are not host work of the wrappers)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for mod in (SDE_K, PL_K):
            for name in [n for n in dir(mod) if n.endswith("_kernel")]:
                monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, kernel):
        outer = self

        class Proxy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    outer.count += 1
                    from torch.utils._python_dispatch import _disable_current_modes
                    with _disable_current_modes():
                        return kernel[grid](*args, **kwargs)
                return launch
        return Proxy()


def _torch_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))
    return Log()


HOST_OK = {"aten.empty", "aten.slice", "aten.select", "aten.detach", "aten.alias"}  # allocation and views



@pytest.mark.parametrize("kind", ["old_model_output", "old_prev_sample_mean", "old_log_prob"])
def test_policy_loss_launches_and_host_work(monkeypatch, kind, seed):
    """Training step: 1 launch forward (split kernels: 2), 1 backward; the wrappers only allocate (torch.empty)
    and take views."""
    B = 3
    v, x = latents(B, (200,), torch.bfloat16, DEVICE)
    roll = gg.sde_step(v, x, 0.7, 0.6)
    old = {"old_model_output": v, "old_prev_sample_mean": roll.prev_sample_mean, "old_log_prob": roll.log_prob}
    kw = {k: (old[k] if k == kind else None) for k in old}
    req = requests.loss_request(
        v.clone().requires_grad_(True), x, roll.prev_sample, 0.7, 0.6, torch.ones(B, device=DEVICE), **kw,
        noise_level=0.7, dynamics="flow", method="grpo", clip_range=1e-3, adv_clip_max=5.0, guard_weight="dt",
        validate=True)
    launches = _Launches(monkeypatch)
    grad_out = torch.ones((), device=DEVICE)
    with _torch_ops() as log:
        loss, stats = tb.policy_loss(req)
        forward = launches.count
        loss.backward(grad_out)
    assert forward == (1 if triton_launch.FUSED else 2) and launches.count == forward + 1
    assert set(log.ops) <= HOST_OK, sorted(set(log.ops) - HOST_OK)
    assert req.model_output.grad is not None and req.model_output.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "scoring"])
def test_sde_step_launches_and_host_work(monkeypatch, rollout, seed):
    B = 2
    v, x = latents(B, (300,), torch.float32, DEVICE)
    v.requires_grad_(True)
    noise = torch.randn(x.shape, device=DEVICE)
    req = requests.sde_request(v, x, 0.7, 0.6, noise_level=0.7, dynamics="flow",
                               prev_sample=None if rollout else x + 0.1 * noise, generator=None,
                               noise=noise if rollout else None, validate=True)
    launches = _Launches(monkeypatch)
    grads = [torch.ones(B, device=DEVICE), torch.ones(x.shape, device=DEVICE)]
    with _torch_ops() as log:
        out = tb.sde_step(req)
        forward = launches.count
        torch.autograd.backward([out.log_prob, out.prev_sample_mean], grads)
    assert forward == (1 if triton_launch.FUSED else 2) and launches.count == forward + 1
    assert set(log.ops) <= HOST_OK, sorted(set(log.ops) - HOST_OK)


def test_host_integer_helpers_match_triton():
    """The launch geometry's plain-Python cdiv / next_power_of_2 (triton's are constexpr functions that cost
    microseconds per host call) give triton's values."""
    for n in [*range(1, 5000), 2 ** 20 - 1, 2 ** 20, 2 ** 20 + 1, 70_000_001]:
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 1024, 2048 * 7):
            assert triton_launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    with pytest.raises(ValueError, match="n >= 1"):
        triton_launch.next_power_of_2(0)


def test_geometry_covers_each_sample_and_ignores_batch(monkeypatch):
    for interpreted in (True, False):
        monkeypatch.setattr(triton_launch, "interpreted", lambda: interpreted)
        for D in (1, 7, 1000, 4096, 65536, 262144, 2_096_640, 70_000_001):
            g = triton_launch.geometry(9, D)
            span = g.block * g.iters
            assert span * g.chunks >= D > span * (g.chunks - 1), (D, g)  # every element once, no empty program
            assert g.chunks <= triton_launch.MAX_CHUNKS and g.cp >= g.chunks and g.cp == 1 << g.log_cp
            assert g.block == 1 << g.log_block
            assert triton_launch.geometry(1, D)[:6] == g[:6]  # B never changes how a sample is summed


def test_unsupported_reason_follows_the_interpreter_setting():
    """Compiled kernels cannot take CPU tensors: the reason says to set TRITON_INTERPRET=1 before the import,
    and says it was set too late when it was set after."""
    script = ("import json, os, torch\n"
              "from grpo_guard.ops import triton_backend as tb\n"
              "a = tb.unsupported_reason(torch.device('cpu'))\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "b = tb.unsupported_reason(torch.device('cpu'))\n"
              "print(json.dumps([a, b]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before and "TRITON_INTERPRET=1" in before and "before" in before
    assert after and "after" in after
    if triton_launch.interpreted():
        assert tb.unsupported_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("finish_rows", [2, 8], ids=["tiles", "one-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lean_kernels_give_the_same_bits(small_chunks, monkeypatch, dtype, finish_rows, seed):
    """The opt-in lean single-launch kernels (triton_launch.LEAN: coefficients before the loads, the register cap,
    the hardware bf16 rounding where compiled, the batch finish reading the rows once when they fit one tile) return
    what the default kernels return, bit for bit: rollout, scoring, policy_loss (guard, dppo) forward, stats and
    backward, several programs per row, the batch in several tiles of rows or in one. (On a CPU the interpreter runs
    the reordered code; the cap and the hardware rounding apply to compiled kernels only.)"""
    if not triton_launch.FUSED:
        pytest.skip("the lean variant is the single-launch kernels'")
    monkeypatch.setattr(triton_launch, "FINISH_ROWS_MAX", finish_rows)
    B = 5
    v, x = latents(B, (10, 100), dtype, DEVICE)
    sig, nxt = sigmas(B)
    noise = torch.randn(x.shape, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    v_new = (v.float() + 1e-2 * torch.randn(v.shape, device=DEVICE)).to(dtype)
    runs = []
    for lean in (False, True):
        monkeypatch.setattr(triton_launch, "LEAN", lean)
        roll = gg.sde_step(v, x, sig, nxt, noise=noise)
        vg = v.clone().requires_grad_(True)
        score = gg.sde_step(vg, x, sig, nxt, prev_sample=roll.prev_sample)
        score.log_prob.sum().backward()
        g_score, vg.grad = vg.grad, None
        run = [roll.prev_sample, roll.log_prob, score.log_prob, score.prev_sample_mean, g_score]
        for method in ("guard", "dppo"):
            vn = v_new.clone().requires_grad_(True)
            loss, st = gg.policy_loss(vn, x, roll.prev_sample, sig, nxt, adv, old_model_output=v, clip_range=0.05,
                                      method=method, kl_threshold=1e-6)
            loss.backward()
            run += [loss, vn.grad] + [st[k] for k in sorted(st)]
        runs.append(run)
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_single_launch_results_do_not_depend_on_program_order(small_chunks, monkeypatch, seed):
    """The single-launch kernels finish a row in whichever of its programs arrives last (common.last_to_arrive) and
    the batch in whichever row finishes last: outputs, error bits and gradients are the same bits when the
    interpreter runs the programs in seeded random orders as when it runs them in index order (a compiled launch
    runs them in the hardware's order; a finish that assumed the last chunk or the last row arrives last, or read
    a partial before its program wrote it, would differ). Interpreter only."""
    if not triton_launch.FUSED:
        pytest.skip("the single-launch kernels' property")
    if not triton_launch.interpreted():
        pytest.skip("the interpreter's program order")
    import random

    from triton.runtime import interpreter
    B = 5
    v, x = latents(B, (10, 100), torch.float32, DEVICE)
    sig, nxt = sigmas(B)
    nxt[2] = sig[2]  # sample 2 breaks sigma_next < sigma: its NaNs and error bit come from the finish
    noise = torch.randn(x.shape, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    v_new = v + 1e-2 * torch.randn(v.shape, device=DEVICE)

    def run():
        out = []
        roll = gg.sde_step(v, x, sig, nxt, noise=noise)
        out += [roll.prev_sample, roll.log_prob, roll.std_dev_t, errors.word(DEVICE).clone()]
        errors.word(DEVICE).zero_()
        xp = roll.prev_sample.nan_to_num()
        for method, old in (("guard", {"old_model_output": v}), ("dppo", {"old_model_output": v}),
                            ("grpo", {"old_log_prob": roll.log_prob.nan_to_num() + 1e-3})):
            vn = v_new.clone().requires_grad_(True)
            loss, st = gg.policy_loss(vn, x, xp, sig, nxt, adv, method=method, clip_range=0.05, **old)
            loss.backward()
            out += [loss, vn.grad, errors.word(DEVICE).clone()] + [st[k] for k in sorted(st)]
            errors.word(DEVICE).zero_()
        return out

    def shuffled(rng):
        def grid_range(*args):
            r = list(range(*args))
            if sys._getframe(1).f_code.co_name == "__call__":  # GridExecutor's loop over program ids
                rng.shuffle(r)
            return r
        return grid_range

    want = run()
    for k in range(3):
        monkeypatch.setattr(interpreter, "range", shuffled(random.Random(seed + k)), raising=False)
        got = run()
        for a, b in zip(got, want):
            assert torch.equal(a.nan_to_num(1.5), b.nan_to_num(1.5)) and torch.equal(a.isnan(), b.isnan())
    assert want[3].item() != 0  # the failed sample raised its bit
