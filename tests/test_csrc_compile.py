"""Compile checks of the CUDA fallback (csrc/) that need no GPU.

- each .cu is compiled to an sm_90 object with plain nvcc (the kernels include no torch header), with the
  defines torch's cpp_extension passes;
- the torch binding (binding.cpp) is syntax-checked with the host compiler against the installed torch's
  headers (a CPU torch ships them; the one generated CUDA header it lacks is stubbed);
- the build helper answers (None, None, reason) instead of raising where the extension cannot be built.
Each check skips with the reason when its tool (nvcc, g++, torch headers, CUDA headers) is absent.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _nvcc():
    home = _cuda_home()
    if home is None:
        pytest.skip("nvcc not found (no CUDA_HOME, /usr/local/cuda or nvcc on PATH)")
    return os.path.join(home, "bin", "nvcc")


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_kernels_include_no_torch_header():
    for name in os.listdir(CSRC):
        if name.endswith((".cu", ".cuh", ".h")):
            text = open(os.path.join(CSRC, name)).read()
            assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, name


@pytest.mark.parametrize("source", CU_FILES)
def test_cu_compiles_sm90(source, tmp_path):
    cmd = [_nvcc(), "-c", "-arch=sm_90", "-O3", "-std=c++17", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES,
           "-Xcompiler", "-Wall", "-I", CSRC, os.path.join(CSRC, source), "-o", str(tmp_path / "k.o")]
    proc = _run(cmd)
    assert os.path.getsize(tmp_path / "k.o") > 0
    assert "warning" not in proc.stderr.lower(), proc.stderr


@pytest.mark.slow
def test_binding_syntax_against_torch_headers(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++)")
    includes = cpp_extension.include_paths()
    if not os.path.exists(os.path.join(includes[0], "torch", "extension.h")):
        pytest.skip("this torch ships no C++ headers")
    home = _cuda_home()
    cuda_inc = os.path.join(home, "include") if home else None
    if cuda_inc is None or not os.path.exists(os.path.join(cuda_inc, "cuda_runtime_api.h")):
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    # a CPU torch lacks the CUDA build's generated c10 header: stub it (it only declares shared-library linkage)
    stub = tmp_path / "stub"
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, macros)) for d in includes):
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{d}" for d in includes], f"-I{stub}", f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_inc}",
           f"-I{CSRC}", os.path.join(CSRC, "binding.cpp")]
    _run(cmd)


def test_build_helper_reports_instead_of_raising(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # the helper may set it; restored after
    sys.path.insert(0, CSRC)
    try:
        import grpo_guard_build as gb
    finally:
        sys.path.remove(CSRC)
    ext, cmdclass, reason = gb.cuda_extension()
    if ext is None:
        assert cmdclass is None and isinstance(reason, str) and reason
    else:  # a CUDA torch with nvcc: a real extension
        assert ext.name == "grpo_guard._C" and "build_ext" in cmdclass and reason is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("GRPO_GUARD_CUDA_ARCHS", "8.0;90;100")
    assert gb._arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                "-gencode=arch=compute_100,code=sm_100",
                                "-gencode=arch=compute_100,code=compute_100"]
    monkeypatch.delenv("GRPO_GUARD_CUDA_ARCHS")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert gb._arch_flags() == []  # torch's own variable wins when ours is unset
