"""What the CUDA extension ``grpo_guard._C`` was built for, and whether it can run here.

A build writes ``grpo_guard/_C_build.json`` next to the extension (csrc/grpo_guard_build.py)::

    {"torch": "2.14.1+cu130", "cuda": "13.0", "archs": ["80", "90", "100"], "ptx": "100"}

An extension only runs with the torch it was compiled against (same major.minor: the C++ ABI changes between
minors), the same CUDA major, and on a GPU whose architecture has a cubin in it (a cubin for sm_XY runs on sm_XZ,
Z >= Y) or is at least the PTX's (JIT-compiled by the driver). Each rule gives a one-line reason, so that a
mismatched install degrades to the triton / torch backends with that reason instead of crashing.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional, Sequence, Tuple

BUILD_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C_build.json")


@functools.lru_cache(maxsize=None)
def build_info(path: Optional[str] = None) -> Optional[Dict]:
    """The build record (default: :data:`BUILD_FILE`), or None (no extension built, or an older source build that
    did not write one). Read once per path."""
    try:
        with open(path or BUILD_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _minor(version: str) -> str:
    """'2.14.1+cu130' -> '2.14'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _cu(cuda: Optional[str]) -> str:
    return "cpu" if not cuda else "cu" + cuda.replace(".", "")


def describe(info: Optional[Dict]) -> str:
    """'torch 2.14 / cu130, sm_80, sm_90, sm_100 + PTX compute_100' (or 'unknown build')."""
    if not info:
        return "unknown build (no _C_build.json)"
    archs = ", ".join(f"sm_{a}" for a in info.get("archs", [])) or "torch's default architectures"
    ptx = f" + PTX compute_{info['ptx']}" if info.get("ptx") else ""
    return f"torch {_minor(info['torch'])} / {_cu(info.get('cuda'))}, {archs}{ptx}"


def runtime_mismatch(info: Optional[Dict], torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why an extension built as ``info`` cannot load under this torch (None if it can, or if unknown)."""
    if not info:
        return None
    if _minor(info["torch"]) != _minor(torch_version) or not torch_cuda:
        return (f"built for torch {_minor(info['torch'])} / {_cu(info.get('cuda'))}, running torch {torch_version}"
                + ("" if torch_cuda else " (a CPU build)"))
    if info.get("cuda") and info["cuda"].split(".")[0] != torch_cuda.split(".")[0]:
        return (f"built for torch {_minor(info['torch'])} / {_cu(info['cuda'])}, running torch {torch_version} "
                f"with CUDA {torch_cuda} (another CUDA major)")
    return None


def runs_on(archs: Sequence[str], ptx: Optional[str], capability: Tuple[int, int]) -> bool:
    """Whether code with cubins for ``archs`` (e.g. ["80", "90"]) and PTX ``ptx`` runs on a GPU of ``capability``."""
    major, minor = capability
    for a in archs:
        a_major, a_minor = int(a[:-1]), int(a[-1])  # "100" -> (10, 0), "90" -> (9, 0)
        if a_major == major and a_minor <= minor:
            return True
    return ptx is not None and int(ptx) <= 10 * major + minor


def arch_mismatch(info: Optional[Dict], capability: Tuple[int, int]) -> Optional[str]:
    """Why the extension has no code for a GPU of ``capability`` (None if it has, or if unknown)."""
    if not info or not info.get("archs"):
        return None
    if runs_on(info["archs"], info.get("ptx"), capability):
        return None
    return (f"built for {', '.join('sm_' + a for a in info['archs'])}"
            + (f" + PTX compute_{info['ptx']}" if info.get("ptx") else "")
            + f", this GPU is sm_{capability[0]}{capability[1]}")
