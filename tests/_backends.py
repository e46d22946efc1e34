"""Which (backend, device) pairs this machine can test, as pytest params (not a test module)."""
from __future__ import annotations

import pytest
import torch

from grpo_guard import dispatch

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def backend_params():
    """Every backend on every device; unavailable ones are skipped with the backend's own reason."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for device in devices:
        for name in dispatch.BACKENDS:
            reason = dispatch.unsupported_reason(name, torch.device(device))
            marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if reason else []
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def tolerances(dtype):
    """(rtol, atol) for compute-dtype results of inputs in ``dtype`` vs a float64 evaluation of the same
    inputs. Inputs are exact in every dtype (the oracle upcasts them), so low-precision inputs still compute in
    float32: the error is float32 arithmetic, not input rounding."""
    return (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)


#: the backends with two kernel sets: triton's split and single-launch forward (triton_launch.FUSED), cuda's first
#: and second (cuda_backend.V2: vector layout, checks in the kernels); the "fused" kernel set parameter selects the
#: second of each
KERNEL_SET_BACKENDS = ("triton", "cuda")
OTHER_KERNEL_SET = "the kernel set is the triton and cuda backends'"


def select_kernel_set(monkeypatch, second: bool) -> None:
    """Both backends' kernel set for one test: the single-launch Triton forward and the second CUDA kernel set
    (second), or the split Triton kernels and the first CUDA kernel set."""
    from grpo_guard.ops import cuda_backend
    monkeypatch.setattr(cuda_backend, "V2", second)
    try:
        from grpo_guard.ops import triton_launch
    except Exception:  # noqa: BLE001  (no Triton: only the cuda backend's setting matters)
        return
    monkeypatch.setattr(triton_launch, "FUSED", second)
