"""CUDA graphs (issue 9): a captured training step replayed after new sigma / advantage / latent values are written
into the same tensors gives the new values' result (eager's, bit for bit); a Python-float sigma cannot be baked into
a capture (refused with an error that says what to do). GPU only; the refusal's logic is unit-tested on the CPU in
tests/test_validation.py."""
import pytest
import torch

import grpo_guard as gg
from grpo_guard import dispatch

from _cases import latents, sd35_sigmas
from _backends import KERNEL_SET_BACKENDS, OTHER_KERNEL_SET, select_kernel_set

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [b for b in ("triton", "cuda", "torch")
                if torch.cuda.is_available() and dispatch.unsupported_reason(b, torch.device("cuda")) is None]


@pytest.fixture(params=["split", "fused"])
def kernel_set(request, monkeypatch):
    select_kernel_set(monkeypatch, request.param == "fused")
    return request.param


def _step(v_old, x, noise, sig, nxt, adv, v):
    roll = gg.sde_step(v_old, x, sig, nxt, noise=noise)
    loss, stats = gg.policy_loss(v, x, roll.prev_sample, sig, nxt, adv, old_model_output=v_old, clip_range=1e-3)
    _, on_policy = gg.policy_loss(v_old, x, roll.prev_sample, sig, nxt, adv, method="grpo",
                                  old_log_prob=roll.log_prob)
    loss.backward()
    return loss, stats["log_ratio"], roll.prev_sample, roll.log_prob, on_policy["log_ratio"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_replay_after_writing_new_values(backend, kernel_set):
    if backend not in KERNEL_SET_BACKENDS and kernel_set == "fused":
        pytest.skip(OTHER_KERNEL_SET)
    torch.manual_seed(0)
    B, dev = 3, torch.device("cuda")
    v_old, x = latents(B, (16, 32, 32), torch.bfloat16, dev)
    v = (v_old.float() + 1e-3 * torch.randn(v_old.shape, device=dev)).bfloat16().requires_grad_(True)
    noise = torch.randn(x.shape, device=dev)
    sig_list = sd35_sigmas()
    sig = torch.full((B,), sig_list[1], dtype=torch.float64, device=dev)
    nxt = torch.full((B,), sig_list[2], dtype=torch.float64, device=dev)
    adv = torch.randn(B, device=dev)
    with gg.backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, caches) outside the capture
            for _ in range(2):
                v.grad = None
                _step(v_old, x, noise, sig, nxt, adv, v)
        torch.cuda.current_stream().wait_stream(side)
        v.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _step(v_old, x, noise, sig, nxt, adv, v)
        grad_in_graph = v.grad  # the captured backward writes here at each replay
        for k in (3, 6, 8):
            sig.fill_(sig_list[k])
            nxt.fill_(sig_list[k + 1])
            adv.copy_(torch.randn(B, device=dev))
            noise.copy_(torch.randn(x.shape, device=dev))
            graph.replay()
            got = [t.clone() for t in outs] + [grad_in_graph.clone()]
            v.grad = None
            want = list(_step(v_old, x, noise, sig, nxt, adv, v)) + [v.grad]
            for a, b in zip(got, want):
                assert torch.equal(a, b), k
            assert torch.equal(got[4], torch.zeros_like(got[4]))  # on-policy ratio exactly 1 in the graph too
    gg.check_errors()


def test_float_sigmas_are_refused_in_a_capture():
    B, dev = 2, torch.device("cuda")
    v, x = latents(B, (4, 8, 8), torch.float32, dev)
    noise = torch.randn(x.shape, device=dev)
    gg.sde_step(v, x, 0.7, 0.6, noise=noise)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="Python floats while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            gg.sde_step(v, x, 0.7, 0.6, noise=noise)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b in KERNEL_SET_BACKENDS])
def test_single_launch_kernels_on_two_streams_at_once(backend, monkeypatch):
    """The single-launch forwards' arrival counters are per (device, stream): the same steps queued on two streams
    at once (each stream many launches deep, so their kernels overlap) give each stream's eager result, bit for bit.
    Shared counters would let one stream's blocks take the other's tickets."""
    select_kernel_set(monkeypatch, True)
    torch.manual_seed(0)
    B, dev = 4, torch.device("cuda")
    inputs = []
    for _ in range(2):
        v_old, x = latents(B, (16, 64, 64), torch.bfloat16, dev)
        v = (v_old.float() + 1e-3 * torch.randn(v_old.shape, device=dev)).bfloat16().requires_grad_(True)
        sig = torch.full((B,), 0.7, dtype=torch.float64, device=dev)
        inputs.append((v_old, x, torch.randn(x.shape, device=dev), sig, sig - 0.1, torch.randn(B, device=dev), v))
    with gg.backend(backend):
        want = []
        for args in inputs:
            args[-1].grad = None
            want.append([t.clone() for t in _step(*args)] + [args[-1].grad.clone()])
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        got = [[], []]
        for _ in range(20):
            for i, (s, args) in enumerate(zip(streams, inputs)):
                with torch.cuda.stream(s):
                    args[-1].grad = None
                    got[i].append(list(_step(*args)) + [args[-1].grad])
        torch.cuda.synchronize()
    for i in range(2):
        for rep in got[i]:
            for a, b in zip(rep, want[i]):
                assert torch.equal(a, b), i
    gg.check_errors()
