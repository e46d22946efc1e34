"""Build helper for the CUDA extension ``grpo_guard._C`` (imported by setup.py; no torch at import time).

``cuda_extension() -> (ext, cmdclass, reason)``: a ``CUDAExtension`` + ninja ``BuildExtension`` where a CUDA
build of torch and nvcc exist, else ``(None, None, reason)``. It never raises for a missing toolchain.

Architectures: sm_80 and sm_90 cubins plus compute_90 PTX (JIT for newer GPUs). Override with
``GRPO_GUARD_CUDA_ARCHS`` (e.g. "80;90;100") or torch's own ``TORCH_CUDA_ARCH_LIST``.
"""
from __future__ import annotations

import glob
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("binding.cpp", "sde_step.cu", "policy_loss.cu")
HEADERS = ("gg_kernels.h", "gg_common.cuh")
DEFAULT_ARCHS = "80;90"


def _arch_flags():
    """nvcc -gencode flags, or [] to let torch read TORCH_CUDA_ARCH_LIST."""
    archs = os.environ.get("GRPO_GUARD_CUDA_ARCHS")
    if not archs and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs = [a.strip().replace(".", "") for a in (archs or DEFAULT_ARCHS).replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _extra_include_dirs(site_dirs):
    """CUDA headers shipped in pip wheels (nvidia/cu13/include, nvidia/cuda_runtime/include), if present."""
    found = []
    for site in site_dirs:
        for pattern in ("nvidia/cu[0-9]*/include", "nvidia/cuda_runtime/include"):
            found += [d for d in sorted(glob.glob(os.path.join(site, pattern))) if os.path.isdir(d)]
    return found


def _toolkit_with_headers():
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime_api.h, for when CUDA_HOME is unset: torch
    would otherwise take the parent of the first nvcc on PATH, which may be a wrapper script's folder."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if all(os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime_api.h"))):
            return home
    return None


def _source(name):
    """Source path relative to the working directory when it is the repository root (setuptools wants that)."""
    path = os.path.join(HERE, name)
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


def cuda_extension():
    """-> (CUDAExtension, {"build_ext": BuildExtension}, None), or (None, None, reason)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _toolkit_with_headers()
        if home:
            os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot build here"
        return None, None, f"torch is not importable ({type(exc).__name__}: {exc})"
    if torch.version.cuda is None:
        return None, None, f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return None, None, "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None, None, f"nvcc not found at {nvcc} (CUDA_HOME={cpp_extension.CUDA_HOME})"
    import site
    sites = [p for p in getattr(site, "getsitepackages", list)() + [site.getusersitepackages()] if p]
    sites.append(os.path.dirname(os.path.dirname(torch.__file__)))
    include_dirs = [HERE] + _extra_include_dirs(dict.fromkeys(sites))
    header_dirs = [os.path.join(cpp_extension.CUDA_HOME, "include")] + include_dirs
    if not any(os.path.exists(os.path.join(d, "cuda_runtime_api.h")) for d in header_dirs):
        return None, None, f"CUDA headers (cuda_runtime_api.h) not found under {cpp_extension.CUDA_HOME}/include"
    ext = cpp_extension.CUDAExtension(
        name="grpo_guard._C",
        sources=[_source(s) for s in SOURCES],
        depends=[_source(h) for h in HEADERS],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"] + _arch_flags()},
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return ext, cmdclass, None
