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
