"""The ops as PyTorch operators (issue 9): torch.library.opcheck of every operator, and torch.compile of a training
step over a whole SD3.5 schedule without graph breaks or per-timestep recompiles, with eager's results.

The Triton operators run under the interpreter on a CPU (opaque custom ops with fake implementations; on a GPU
they are triton_ops whose kernels the compiler sees), the torch operators anywhere. CUDA graphs: on a GPU.
"""
import itertools

import pytest
import torch

import grpo_guard as gg
from grpo_guard import dispatch
from grpo_guard import reference as ref
from grpo_guard.ops import library

from _cases import latents, sd35_sigmas
from _backends import KERNEL_SET_BACKENDS, OTHER_KERNEL_SET, select_kernel_set

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BACKENDS = [b for b in ("torch", "triton", "cuda") if dispatch.unsupported_reason(b, DEVICE) is None]
METHOD_KINDS = [("grpo", "old_log_prob"), ("grpo", "old_prev_sample_mean"), ("grpo", "old_model_output"),
                ("mean_revised", "old_prev_sample_mean"), ("mean_revised", "old_model_output"),
                ("ratio_norm", "old_model_output"), ("ratio_norm", "old_prev_sample_mean"),
                ("guard", "old_model_output"), ("guard", "old_prev_sample_mean"),
                ("dppo", "old_model_output"), ("dppo", "old_prev_sample_mean")]
OLD_KIND = {"old_log_prob": 0, "old_prev_sample_mean": 1, "old_model_output": 2}


@pytest.fixture(params=["split", "fused"])
def kernel_set(request, monkeypatch):
    select_kernel_set(monkeypatch, request.param == "fused")
    return request.param == "fused"


def _schedule(B, dtype=torch.float64):
    sig = torch.linspace(0.9, 0.5, B, dtype=dtype, device=DEVICE)
    return sig, sig - 0.1


def _policy_case(dtype, dynamics, kind, B=3, shape=(4, 16)):
    v_old, x = latents(B, shape, dtype, DEVICE)
    sig, nxt = _schedule(B)
    roll = ref.sde_step(v_old, x, sig, nxt, dynamics=dynamics, noise=torch.randn(x.shape, device=DEVICE,
                                                                                   dtype=ref.compute_dtype(x)))
    old = {"old_log_prob": roll.log_prob, "old_prev_sample_mean": roll.prev_sample_mean,
           "old_model_output": v_old}[kind]
    v = (v_old.double() + 1e-3 * torch.randn(v_old.shape, dtype=torch.float64, device=DEVICE)).to(dtype)
    return v.requires_grad_(True), x, roll.prev_sample, old, torch.randn(B, device=DEVICE), sig, nxt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i, method_kind, dtype", [(i, mk, dt) for i, (mk, dt) in
                                                   enumerate(itertools.product(METHOD_KINDS, DTYPES))])
def test_opcheck_policy_loss(backend, kernel_set, i, method_kind, dtype):
    """Every method x old input x dtype (dynamics and float/tensor sigmas cycle through the cases)."""
    if backend not in KERNEL_SET_BACKENDS and kernel_set:
        pytest.skip(OTHER_KERNEL_SET)
    method, kind = method_kind
    dynamics = ("flow", "dance", "cps")[i % 3]
    v, x, xp, old, adv, sig, nxt = _policy_case(dtype, dynamics, kind)
    tensor_sigmas = i % 2 == 0
    sig_args = (sig, nxt, 0.0, 0.0) if tensor_sigmas else (None, None, 0.9, 0.8)
    common = (0.7, dynamics, method, 1e-3, 5.0, "beta_dt" if i % 4 == 3 else "dt")
    if backend == "triton":
        op = torch.ops.grpo_guard.policy_loss_triton.default
        args = (v, x, xp, old if kind != "old_log_prob" else None, adv, old if kind == "old_log_prob" else None,
                *sig_args, *common, OLD_KIND[kind], True, kernel_set, 1e-5)  # check, fused, kl_threshold
    elif backend == "cuda":
        from grpo_guard.ops import cuda_backend, requests
        req = requests.loss_request(v, x, xp, sig if tensor_sigmas else 0.9, nxt if tensor_sigmas else 0.8, adv,
                                    **{k: (old if kind == k else None) for k in OLD_KIND}, noise_level=0.7,
                                    dynamics=dynamics, method=method, clip_range=1e-3, adv_clip_max=5.0,
                                    guard_weight=common[-1], validate=True)
        v_, x_, xp_, mu_old, v_old, adv_, old_lp, sched, cfg = cuda_backend._loss_inputs(req)
        op = torch.ops.grpo_guard.policy_loss_cuda.default
        args = (v_, x_, xp_, mu_old, v_old, adv_, old_lp, *sched, *cfg)
    else:
        olds = [old if kind == k else None for k in ("old_log_prob", "old_prev_sample_mean", "old_model_output")]
        op = torch.ops.grpo_guard.policy_loss_torch.default
        args = (v, x, xp, *olds, adv, *sig_args, *common, True, 1e-5)  # check, kl_threshold
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dynamics", ["flow", "dance", "cps"])
def test_opcheck_sde_step(backend, kernel_set, dtype, dynamics):
    """Rollout and scoring, with and without the mean, float and tensor sigmas (cycling through the cases)."""
    if backend not in KERNEL_SET_BACKENDS and kernel_set:
        pytest.skip(OTHER_KERNEL_SET)
    B = 3
    v, x = latents(B, (4, 16), dtype, DEVICE)
    v.requires_grad_(True)
    sig, nxt = _schedule(B)
    k = DTYPES.index(dtype) + 4 * ("flow", "dance", "cps").index(dynamics)
    rollout, return_mean, tensor_sigmas = k % 2 == 0, k % 3 != 0, k % 4 < 2
    cd = ref.compute_dtype(x)
    noise = torch.randn(x.shape, device=DEVICE, dtype=cd) if rollout else None
    prev = None if rollout else (x.double() + 0.1 * torch.randn(x.shape, device=DEVICE, dtype=torch.float64)).to(dtype)
    sig_args = (sig, nxt, 0.0, 0.0) if tensor_sigmas else (None, None, 0.9, 0.8)
    args = (v, x, prev, noise, *sig_args, 0.7, dynamics, return_mean, True)
    if backend == "triton":
        torch.library.opcheck(torch.ops.grpo_guard.sde_step_triton.default, args + (kernel_set,))
    elif backend == "cuda":
        from grpo_guard.ops import cuda_backend, requests
        req = requests.sde_request(v, x, sig if tensor_sigmas else 0.9, nxt if tensor_sigmas else 0.8,
                                   noise_level=0.7, dynamics=dynamics, prev_sample=prev, generator=None, noise=noise,
                                   validate=True, return_mean=return_mean)
        v_, x_, p_, noise_, sched, round_mode, need_mean, vec = cuda_backend._sde_inputs(req)
        torch.library.opcheck(torch.ops.grpo_guard.sde_step_cuda.default,
                              (v_, x_, p_, noise_, *sched, round_mode, need_mean, vec))
    else:
        torch.library.opcheck(torch.ops.grpo_guard.sde_step_torch.default, args)


def _training_step(W):
    """One timestep of a Flow-GRPO-style loop: a rollout step of the old policy (x', log p and the mean), a new
    velocity from a (tiny) model, its GRPO-Guard loss; and the old policy scored against its own rollout through
    the stored mean and the stored log-prob, whose log-ratios must be exactly 0."""
    def step(x, sig, nxt, v_old, noise, adv):
        roll = gg.sde_step(v_old, x, sig, nxt, noise=noise)
        v = v_old + torch.einsum("ij,bjhw->bihw", W, x)
        loss, stats = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, adv, old_model_output=v_old, clip_range=1e-3)
        _, by_mean = gg.policy_loss(v_old, x, roll.prev_sample, sig, nxt, adv, method="ratio_norm",
                                    old_prev_sample_mean=roll.prev_sample_mean)
        _, by_log_prob = gg.policy_loss(v_old, x, roll.prev_sample, sig, nxt, adv, method="grpo",
                                        old_log_prob=roll.log_prob)
        return loss, stats["log_ratio"], roll.prev_sample, torch.cat([by_mean["log_ratio"], by_log_prob["log_ratio"]])
    return step


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigmas_as", ["tensors", "floats"])
def test_compiled_training_step_over_the_schedule(backend, kernel_set, sigmas_as):
    """fullgraph=True, every trained timestep of the SD3.5 10-step schedule: one compilation with tensor sigmas
    (floats: at most two, the first specialized, then dynamic); the on-policy log-ratio exactly 0 (through the
    stored mean and the stored log-prob); eager's loss, x', log-ratios and gradient: bit for bit on the Triton
    operators under the interpreter, within 1e-5 relative under inductor (which may fuse the reference's torch
    ops, reordering sums, and compiles user Triton kernels with FMA contraction on)."""
    if backend not in KERNEL_SET_BACKENDS and kernel_set:
        pytest.skip(OTHER_KERNEL_SET)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    B = 2
    W = torch.nn.Parameter(0.1 * torch.randn(4, 4, device=DEVICE))
    v_old, x0 = latents(B, (4, 8, 8), torch.float32, DEVICE)
    adv = torch.randn(B, device=DEVICE)
    step = _training_step(W)
    sig_list = sd35_sigmas()
    dynamo.reset()
    counters.clear()
    with gg.backend(backend):
        # the interpreter's opaque operators gain nothing from inductor on a CPU; on a GPU inductor launches the
        # Triton kernels itself (triton_op)
        cpu_triton = backend == "triton" and DEVICE.type == "cpu"
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if cpu_triton else "inductor")
        for i in range(9):
            if sigmas_as == "tensors":
                sig = torch.full((B,), sig_list[i], dtype=torch.float64, device=DEVICE)
                nxt = torch.full((B,), sig_list[i + 1], dtype=torch.float64, device=DEVICE)
            else:
                sig, nxt = sig_list[i], sig_list[i + 1]
            noise = torch.randn(x0.shape, device=DEVICE)
            outs, grads = [], []
            # inductor may fuse the reference's torch ops (reordering sums) and launches user Triton kernels with FMA
            # contraction on (only the arithmetic the on-policy ratio needs is explicitly rounded)
            exact = cpu_triton
            for fn in (compiled, step):
                W.grad = None
                loss, log_ratio, xp, on_policy = fn(x0, sig, nxt, v_old, noise, adv)
                loss.backward()
                outs.append((loss.detach(), log_ratio, xp))
                grads.append(W.grad.clone())
                assert torch.equal(on_policy, torch.zeros_like(on_policy)), (i, on_policy)  # ratio exactly 1
            for a, b in list(zip(*outs)) + [tuple(grads)]:
                if exact:
                    assert torch.equal(a, b), (i, a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    frames = counters["stats"]["unique_graphs"]
    assert frames == 1 if sigmas_as == "tensors" else 1 <= frames <= 2, frames
    gg.check_errors()
