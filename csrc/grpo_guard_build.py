"""Build helper for the CUDA extension ``grpo_guard._C`` (imported by setup.py; no torch at import time).

``cuda_extension() -> (ext, cmdclass, reason)``: a ``CUDAExtension`` + ninja ``BuildExtension`` where a CUDA
build of torch and nvcc exist, else ``(None, None, reason)``. It never raises for a missing toolchain.

Architectures: sm_80, sm_90 and sm_100 cubins plus compute_100 PTX (JIT for newer GPUs), as the wheels ship
them. Override with ``GRPO_GUARD_CUDA_ARCHS`` (e.g. "90" for a quick local build; the last one also gets PTX) or
torch's own ``TORCH_CUDA_ARCH_LIST``.

The build writes ``grpo_guard/_C_build.json`` next to the extension (torch and CUDA versions, architectures),
which grpo_guard.ops.cuda_build reads to explain a mismatched install; :func:`local_version` gives the wheel's
local version label (``+cu130torch2.14``).
"""
from __future__ import annotations

import glob
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("binding.cpp", "sde_step.cu", "policy_loss.cu")
HEADERS = ("gg_kernels.h", "gg_common.cuh")
DEFAULT_ARCHS = "80;90;100"


def archs():
    """(cubin architectures, PTX architecture) of this build, e.g. (["80", "90", "100"], "100"); ([], None) when
    torch's TORCH_CUDA_ARCH_LIST decides (then it is recorded as given)."""
    given = os.environ.get("GRPO_GUARD_CUDA_ARCHS")
    if not given and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return [], None
    out = [a.strip().replace(".", "") for a in (given or DEFAULT_ARCHS).replace(",", ";").split(";") if a.strip()]
    return out, out[-1]


def _arch_flags():
    """nvcc -gencode flags, or [] to let torch read TORCH_CUDA_ARCH_LIST."""
    cubins, ptx = archs()
    if not cubins:
        return []
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cubins]
    return flags + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


def build_record():
    """What grpo_guard/_C_build.json records (torch imported: call at build time only)."""
    import torch

    cubins, ptx = archs()
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "archs": cubins, "ptx": ptx}
    if not cubins:
        record["torch_cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return record


def local_version():
    """The wheel's local version label for this torch / CUDA: 'cu130torch2.14' (PEP 440: +cu130torch2.14)."""
    import torch

    return f"cu{torch.version.cuda.replace('.', '')}torch{'.'.join(torch.__version__.split('+')[0].split('.')[:2])}"


def _with_build_record(base):
    """``base`` build_ext that also writes _C_build.json next to the built extension (wheel or in place)."""

    class BuildExtWithRecord(base):
        def run(self):
            super().run()
            for ext in self.extensions:
                if ext.name == "grpo_guard._C":
                    path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C_build.json")
                    with open(path, "w") as f:
                        json.dump(build_record(), f, indent=1)

    return BuildExtWithRecord


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
    cmdclass = {"build_ext": _with_build_record(cpp_extension.BuildExtension.with_options(use_ninja=True))}
    return ext, cmdclass, None
