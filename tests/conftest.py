"""Test setup shared by every test module.

TRITON_INTERPRET=1 must be in the environment before any Triton kernel module is imported, so it is set
here (before the tests import grpo_guard's kernels) whenever no CUDA GPU is present: the Triton backend then
runs on CPU tensors through the interpreter. Likewise the cuda backend runs csrc's kernels through a CPU
emulator (tests/_cuda_emu.py; GRPO_GUARD_TEST_CUDA_EMULATOR=0 turns it off).
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import grpo_guard as gg  # noqa: E402
import _cuda_emu  # noqa: E402
from _backends import backend_params  # noqa: E402

# Without a GPU, the cuda backend runs csrc's kernels through the CPU emulator (tests/_cuda_emu.py), before the
# backend parameters below are made: "cuda-cpu" then runs wherever "triton-cpu" does.
_cuda_emu.install()


def base_seed() -> int:
    """The run's base seed: GRPO_GUARD_TEST_SEED (an integer, or "random" for a fresh one), default 0."""
    value = os.environ.get("GRPO_GUARD_TEST_SEED", "0").strip()
    if value == "random":
        value = str(int.from_bytes(os.urandom(4), "little"))
        os.environ["GRPO_GUARD_TEST_SEED"] = value  # the same for the whole run (and for xdist workers)
    return int(value)


BASE_SEED = base_seed()


def pytest_report_header(config):
    return (f"grpo_guard test seed: {BASE_SEED} (GRPO_GUARD_TEST_SEED=<int> reruns with another, =random draws one); "
            "each test seeds torch with crc32(base seed, test id)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """This test's seed, crc32 of the run's base seed and the test id: reproducible (same base seed, same
    inputs), distinct between tests; torch is seeded with it and it is printed (shown on failure)."""
    s = zlib.crc32(f"{BASE_SEED}:{request.node.nodeid}".encode())
    torch.manual_seed(s)
    print(f"torch seed {s} (base seed {BASE_SEED}, GRPO_GUARD_TEST_SEED)")
    return s


@pytest.fixture(params=backend_params())
def bk(request):
    """(backend name, device) for every backend on every device of this machine, run inside
    ``grpo_guard.backend(name)``; unavailable ones are skipped with the backend's own reason."""
    name, device = request.param
    with gg.backend(name):
        yield name, torch.device(device)
