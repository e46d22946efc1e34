"""The CPU emulator that runs the CUDA fallback's kernels without a GPU (tests/_cuda_emu.py, tests/cuda_emu/).

Without a GPU, every backend-parametrized test and tests/test_cuda_backend.py run the ``cuda`` backend through it;
these tests make sure that coverage cannot silently vanish (a build that fails is a failure here, not a skip) and
that the emulator keeps the CUDA semantics the kernels rely on.
"""
import os
import shutil
import subprocess

import pytest
import torch

import grpo_guard as gg
import _cuda_emu

ACCEPTED_REASONS = ("a GPU is present", "GRPO_GUARD_TEST_CUDA_EMULATOR=0", "no C++ compiler")


def test_emulated_extension_builds_where_it_can():
    reason = _cuda_emu.reason()
    assert reason is None or reason.startswith(ACCEPTED_REASONS), reason
    if reason is None:
        assert "cuda" in gg.available_backends("cpu")
        with gg.backend("cuda"):
            gg.sde_step(torch.randn(2, 3), torch.randn(2, 3), 0.7, 0.6)
        assert gg.last_backend() == "cuda"


def test_emulated_backend_runs_the_binding_checks():
    """The binding's own argument checks run too (here: a latent the Python layer would never pass)."""
    if _cuda_emu.module() is None:
        pytest.skip(_cuda_emu.reason())
    v = torch.randn(2, 8)
    sched = (None, None, 0.7, 0.6, 0.7, 0.0, 0)
    with pytest.raises(RuntimeError, match="contiguous samples"):
        _cuda_emu.module().sde_forward(v, v[:, ::2].repeat(1, 2)[:, ::2], None, torch.randn(2, 8), *sched, 0, True, 0)
    with pytest.raises(RuntimeError, match="always writes the mean"):
        _cuda_emu.module().sde_forward(v, v, None, torch.randn(2, 8), *sched, 0, False, 0)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / "selftest"
    src = os.path.join(_cuda_emu.EMU, "selftest.cpp")
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-I",
                           os.path.join(_cuda_emu.EMU, "include"), src, os.path.join(_cuda_emu.EMU, "emu_switch.cpp"),
                           "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return {k: float(v) for k, v in (line.split() for line in run.stdout.splitlines())}


def test_barrier_and_shared_memory(selftest):
    assert selftest["neighbour_errors"] == 0 and selftest["neighbour_launch"] == 0


def test_warp_shuffles(selftest):
    assert selftest["down_lane0_warp0"] == sum(range(32))  # shuffle-down tree: lane 0 holds its warp's sum
    assert selftest["down_lane0_warp1"] == sum(range(32, 64))
    assert selftest["butterfly_warp0"] == sum(range(32))  # xor butterfly: every lane holds it
    assert selftest["butterfly_disagreeing_lanes"] == 0


def test_blocks_and_atomics(selftest):
    assert selftest["tickets_last_sum"] == 1 + 2 + 3 + 4 + 5  # the last ticket sees every block's write
    assert selftest["tickets_counter_reset"] == 0


def test_a_barrier_that_cannot_complete_is_a_launch_error(selftest):
    assert selftest["divergent_launch"] == 4  # cudaErrorLaunchFailure
    assert selftest["divergent_message_names_barrier"] == 1
    assert selftest["error_cleared"] == 0  # cudaGetLastError clears it, as CUDA's does
    assert selftest["after_error_launch"] == 0
