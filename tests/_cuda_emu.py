"""The ``cuda`` backend on a machine without a GPU: csrc/ built for the CPU emulator (tests/cuda_emu), installed
in place of ``grpo_guard._C`` for CPU tensors (not a test module).

The build is the real extension (csrc/binding.cpp, sde_step.cu, policy_loss.cu, unchanged) compiled with g++ and
``-DGG_EMULATE``: the kernels run through tests/cuda_emu/include/gg_emu.h (blocks one after another, the threads
of a block as cooperative user-level threads, so barriers and warp shuffles keep their CUDA meaning), the
binding accepts CPU tensors and registers its operators for the CPU dispatch key. Everything above the
extension (ops/cuda_backend.py: inputs, autograd, device-side checks, the torch.library operators and the
compiled path) is the package's own code. What this cannot show is what only a GPU shows: timing, races between
blocks, memory errors, CUDA-specific math (see gg_emu.h).

:func:`install` runs from conftest.py on a machine without CUDA (``GRPO_GUARD_TEST_CUDA_EMULATOR=0`` turns it
off); the build is cached by torch.utils.cpp_extension (about a minute the first time).
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(ROOT, "tests", "cuda_emu")
NAME = "grpo_guard_C_emu"

_module = None
_reason: Optional[str] = None
PACKAGE_UNSUPPORTED_REASON = None  # the package's own cuda_backend.unsupported_reason, once replaced


def build(verbose: bool = False):
    """The emulated extension module (compiled once per source change)."""
    from torch.utils.cpp_extension import load
    return load(name=NAME, sources=[os.path.join(CSRC, "binding.cpp"), os.path.join(EMU, "sde_step_emu.cpp"),
                                    os.path.join(EMU, "policy_loss_emu.cpp"), os.path.join(EMU, "emu_switch.cpp")],
                extra_cflags=["-DGG_EMULATE", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas"],
                extra_include_paths=[os.path.join(EMU, "include"), CSRC], with_cuda=False, verbose=verbose)


def install() -> Optional[str]:
    """Make the cuda backend run the emulated extension on CPU tensors; None on success, else why not."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _reason
    if torch.cuda.is_available():
        _reason = "a GPU is present: the cuda backend runs the real extension"
    elif os.environ.get("GRPO_GUARD_TEST_CUDA_EMULATOR", "1").strip() == "0":
        _reason = "GRPO_GUARD_TEST_CUDA_EMULATOR=0"
    elif shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        _reason = "no C++ compiler or ninja to build the emulated extension"
    else:
        try:
            _module = build()
        except Exception as exc:  # a build failure is a test failure of test_cuda_emulator, not a crash here
            _reason = f"the emulated extension did not build: {type(exc).__name__}: {str(exc)[-2000:]}"
    if _module is not None:
        _use(_module)
    return _reason


def _use(module) -> None:
    global PACKAGE_UNSUPPORTED_REASON
    from grpo_guard.ops import cuda_backend, library
    PACKAGE_UNSUPPORTED_REASON = cuda_backend.unsupported_reason
    cuda_backend._ext, cuda_backend._ext_error = module, None
    cuda_backend.unsupported_reason = _unsupported_reason
    library._register_cuda_ops()  # what import does with a built extension: fakes, autograd, the compiled path


def _unsupported_reason(device):
    device = torch.device(device)
    return None if device.type == "cpu" else f"the emulated cuda backend runs on CPU tensors only, got {device}"


def module():
    return _module


def reason() -> Optional[str]:
    return _reason
