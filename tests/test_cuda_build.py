"""A mismatched CUDA extension degrades with a one-line reason (grpo_guard.ops.cuda_build): the rules for torch,
CUDA and GPU architecture, and the cuda backend / dispatch behaviour with a build record that does not match."""
import json

import pytest
import torch

import grpo_guard as gg
from grpo_guard.ops import cuda_backend, cuda_build

WHEEL = {"torch": "2.14.1+cu130", "cuda": "13.0", "archs": ["80", "90", "100"], "ptx": "100"}


def test_describe():
    assert cuda_build.describe(WHEEL) == "torch 2.14 / cu130, sm_80, sm_90, sm_100 + PTX compute_100"
    assert "unknown build" in cuda_build.describe(None)


@pytest.mark.parametrize("torch_version, torch_cuda, want", [
    ("2.14.1+cu130", "13.0", None),
    ("2.14.0+cu130", "13.0", None),                      # patch releases share the ABI
    ("2.14.1+cu130", "13.1", None),                      # CUDA minor releases are compatible
    ("2.11.0+cu130", "13.0", "built for torch 2.14 / cu130, running torch 2.11.0+cu130"),
    ("2.13.0+cpu", None, "built for torch 2.14 / cu130, running torch 2.13.0+cpu (a CPU build)"),
    ("2.14.1+cpu", None, "built for torch 2.14 / cu130, running torch 2.14.1+cpu (a CPU build)"),
    ("2.14.1+cu128", "12.8", "built for torch 2.14 / cu130, running torch 2.14.1+cu128 with CUDA 12.8 (another "
                             "CUDA major)"),
])
def test_runtime_mismatch_names_both_builds(torch_version, torch_cuda, want):
    assert cuda_build.runtime_mismatch(WHEEL, torch_version, torch_cuda) == want
    assert cuda_build.runtime_mismatch(None, torch_version, torch_cuda) is None  # no record: try the import


@pytest.mark.parametrize("capability, ok", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),     # sm_80 SASS runs on every 8.x at or above it
    ((9, 0), True), ((10, 0), True),
    ((12, 0), True),                                     # newer than every cubin: the compute_100 PTX (JIT)
    ((7, 5), False), ((7, 0), False),                    # older than every cubin and the PTX
])
def test_architecture_rule(capability, ok):
    assert cuda_build.runs_on(WHEEL["archs"], WHEEL["ptx"], capability) is ok
    reason = cuda_build.arch_mismatch(WHEEL, capability)
    assert (reason is None) is ok
    if not ok:
        assert reason == (f"built for sm_80, sm_90, sm_100 + PTX compute_100, this GPU is "
                          f"sm_{capability[0]}{capability[1]}")
    assert not cuda_build.runs_on(["90"], None, (10, 0))  # no PTX: a 9.0 cubin does not run on 10.0
    assert not cuda_build.runs_on(["90"], None, (8, 0))


def test_a_build_for_another_torch_is_not_imported_and_auto_falls_back(tmp_path, monkeypatch):
    """The record says another torch: the extension is not imported, the cuda backend's reason is that one line,
    auto never picks it, and forcing it raises BackendUnavailable with the line."""
    rec = tmp_path / "_C_build.json"
    rec.write_text(json.dumps(dict(WHEEL, torch="2.9.0+cu130")))
    monkeypatch.setattr(cuda_build, "BUILD_FILE", str(rec))
    cuda_build.build_info.cache_clear()
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "_ext_error", None)
    try:
        assert cuda_backend._load() is None
        running = f"running torch {torch.__version__}"
        assert cuda_backend._ext_error.startswith("grpo_guard._C built for torch 2.9 / cu130, " + running)
        assert "\n" not in cuda_backend._ext_error
        assert cuda_backend.status().startswith("not loaded: grpo_guard._C built for torch 2.9")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            assert "built for torch 2.9 / cu130" in cuda_backend.unsupported_reason(torch.device("cuda"))
        x = torch.randn(2, 16, device=device)
        gg.sde_step(x, x, 0.6, 0.5)
        assert gg.last_backend() != "cuda"
        if device == "cuda":
            with gg.backend("cuda"), pytest.raises(gg.BackendUnavailable, match="built for torch 2.9 / cu130"):
                gg.sde_step(x, x, 0.6, 0.5)
    finally:
        cuda_build.build_info.cache_clear()


def test_a_pure_install_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_build, "BUILD_FILE", str(tmp_path / "absent.json"))
    cuda_build.build_info.cache_clear()
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "_ext_error", None)
    import builtins
    real_import = builtins.__import__

    def no_c(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_C" in fromlist and (globals or {}).get("__package__", "").startswith("grpo_guard"):
            raise ImportError("No module named 'grpo_guard._C'")
        return real_import(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, "__import__", no_c)
    try:
        assert cuda_backend._load() is None
        assert "grpo_guard._C is not built (the pure-Python install)" in cuda_backend._ext_error
    finally:
        cuda_build.build_info.cache_clear()
