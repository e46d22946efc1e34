"""Test setup shared by every test module.

TRITON_INTERPRET=1 must be in the environment before any Triton kernel module is imported, so it is set
here (before the tests import grpo_guard's kernels) whenever no CUDA GPU is present: the Triton backend then
runs on CPU tensors through the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import grpo_guard as gg  # noqa: E402
from _backends import backend_params  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id's output) for fresh random inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"torch seed {s}")
    return s


@pytest.fixture(params=backend_params())
def bk(request):
    """(backend name, device) for every backend on every device of this machine, run inside
    ``grpo_guard.backend(name)``; unavailable ones are skipped with the backend's own reason."""
    name, device = request.param
    with gg.backend(name):
        yield name, torch.device(device)
