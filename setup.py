"""Build script: the pure-Python package always, the CUDA fallback (grpo_guard._C) where it can be built.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are shipped as the
``grpo_guard.kernels`` subpackage, so nothing installs a top-level module called ``kernels``.

The CUDA extension needs a CUDA build of torch and nvcc. Where either is missing the extension is skipped
with a message and ``pip install .`` still succeeds; ``GRPO_GUARD_BUILD_CUDA=1`` turns the skip into an
error, ``GRPO_GUARD_BUILD_CUDA=0`` skips it without looking.

Version: grpo_guard/__init__.py's ``__version__``; a build with the extension gets the local label of the torch /
CUDA it was compiled against (``0.2.0+cu130torch2.14``, as flash-attention and PyTorch's own wheels name it) unless
``GRPO_GUARD_LOCAL_VERSION=0``. Wheels: csrc/build_wheels.sh.
"""
import os
import re
import sys

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["grpo_guard", "grpo_guard.*"]) + ["grpo_guard.kernels"]
PACKAGE_DIR = {"grpo_guard.kernels": "kernels"}


HERE = os.path.dirname(os.path.abspath(__file__))


def _base_version():
    with open(os.path.join(HERE, "grpo_guard", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cuda_extension():
    """Return (ext_modules, cmdclass) for grpo_guard._C, or ([], {}) with a printed reason."""
    want = os.environ.get("GRPO_GUARD_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no"):
        print("grpo_guard: GRPO_GUARD_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    try:
        from grpo_guard_build import cuda_extension  # noqa: E402  (local helper, see csrc/)
    except ImportError:
        cuda_extension = None
    reason = None
    if cuda_extension is None:
        reason = "csrc build helper not found"
    else:
        try:
            ext, cmdclass, reason = cuda_extension()
        except Exception as exc:  # a broken toolchain must not break `pip install .`
            ext, cmdclass, reason = None, None, f"{type(exc).__name__}: {exc}"
        if ext is not None:
            return [ext], cmdclass
    if want in ("1", "true", "yes"):
        raise RuntimeError(f"GRPO_GUARD_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"grpo_guard: skipping the CUDA extension ({reason}); the triton and torch backends remain",
          file=sys.stderr)
    return [], {}


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
ext_modules, cmdclass = _cuda_extension()

# the demo's shipped base-model weights (grpo_guard/demo/assets/, < 1 MB)
PACKAGE_DATA = {"grpo_guard.demo": ["assets/*.safetensors"]}

VERSION = _base_version()
if ext_modules and os.environ.get("GRPO_GUARD_LOCAL_VERSION", "1").lower() not in ("0", "false", "no"):
    from grpo_guard_build import local_version
    VERSION += "+" + local_version()

setup(version=VERSION, packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA,
      ext_modules=ext_modules, cmdclass=cmdclass)
