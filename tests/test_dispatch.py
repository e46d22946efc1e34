"""Backend choice: env var, context manager, auto, unavailable backends, which one ran."""
import pytest
import torch

import grpo_guard as gg
from grpo_guard import dispatch


def _run():
    v = torch.randn(2, 3)
    return gg.sde_step(v, torch.randn(2, 3), 0.5, 0.4)


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("GRPO_GUARD_BACKEND", raising=False)
    _run()
    assert gg.last_backend() == "torch"
    assert "torch" in gg.available_backends("cpu")


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("GRPO_GUARD_BACKEND", "torch")
    _run()
    assert gg.last_backend() == "torch"
    monkeypatch.setenv("GRPO_GUARD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GRPO_GUARD_BACKEND"):
        _run()
    with gg.backend("torch"):  # the context manager wins over the env var
        _run()
    assert gg.last_backend() == "torch"


def test_explicit_unavailable_backend_raises(monkeypatch):
    from grpo_guard.ops import cuda_backend
    import _cuda_emu
    monkeypatch.setattr(cuda_backend, "unsupported_reason",  # the package's own rule, not the emulator's
                        _cuda_emu.PACKAGE_UNSUPPORTED_REASON or cuda_backend.unsupported_reason)
    reason = dispatch.unsupported_reason("cuda", torch.device("cpu"))
    assert reason  # the CUDA extension never runs on CPU tensors
    with gg.backend("cuda"):
        with pytest.raises(gg.BackendUnavailable, match="'cuda' requested but unavailable on cpu"):
            _run()
    with pytest.raises(ValueError, match="backend must be one of"):
        with gg.backend("fast"):
            pass


def test_context_manager_restores(monkeypatch):
    monkeypatch.delenv("GRPO_GUARD_BACKEND", raising=False)
    with gg.backend("torch"):
        with gg.backend("auto"):
            assert dispatch.requested() == "auto"
        assert dispatch.requested() == "torch"
    assert dispatch.requested() == "auto"


def test_info_says_which_kernel_sets_run(monkeypatch):
    """grpo-guard info names each fused backend's kernel set and the switch to the other one."""
    from grpo_guard import info
    from grpo_guard.ops import cuda_backend, triton_launch
    monkeypatch.setattr(cuda_backend, "V2", True)
    monkeypatch.setattr(triton_launch, "FUSED", False)
    assert "triton split forward" in info.kernel_sets() and "cuda second set" in info.kernel_sets()
    monkeypatch.setattr(cuda_backend, "V2_FUSED", True)
    assert "single-launch forwards (GRPO_GUARD_CUDA_V2_FUSED=0: two launches)" in info.kernel_sets()
    monkeypatch.setattr(cuda_backend, "V2_FUSED", False)
    assert "two-launch forwards (GRPO_GUARD_CUDA_V2_FUSED=1" in info.kernel_sets()
    monkeypatch.setattr(cuda_backend, "V2", False)
    monkeypatch.setattr(triton_launch, "FUSED", True)
    monkeypatch.setattr(triton_launch, "LEAN", False)
    text = info.kernel_sets()
    assert "triton single-launch forward" in text and "cuda default (GRPO_GUARD_CUDA_V2=1" in text
    assert "default variant (GRPO_GUARD_TRITON_LEAN=1: lean" in text
    monkeypatch.setattr(triton_launch, "LEAN", True)
    assert "lean variant (opt-in, GRPO_GUARD_TRITON_LEAN=1)" in info.kernel_sets()
