#!/usr/bin/env bash
# Build grpo_guard's two wheels into dist/ (or the folder given as $1), from the repository root:
#
#   grpo_guard-<v>+cu<CUDA>torch<M.m>-cp<py>-cp<py>-linux_<arch>.whl   the platform wheel: the package, the Triton
#       kernels, the demo weights and grpo_guard._C compiled for sm_80, sm_90, sm_100 + PTX compute_100
#       (GRPO_GUARD_CUDA_ARCHS="80;90;100" to change), against the torch of this Python (a CUDA build) with
#       CUDA_HOME's nvcc. One per (Python, torch major.minor, CUDA major), like flash-attention's release wheels.
#   grpo_guard-<v>-py3-none-any.whl    the universal wheel: everything but the extension (triton + torch backends).
#
# Needs, already installed: the CUDA torch you target, nvcc (CUDA_HOME or /usr/local/cuda), setuptools, wheel,
# ninja. Nothing is downloaded (--no-build-isolation --no-deps). Example, the one that was checked:
#   python -m venv /tmp/cu214 && /tmp/cu214/bin/pip install torch==2.14.1 numpy setuptools wheel ninja
#   PYTHON=/tmp/cu214/bin/python CUDA_HOME=/usr/local/cuda bash csrc/build_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-dist}")
PY=${PYTHON:-python}
mkdir -p "$OUT"
clean() { rm -rf build grpo_guard.egg-info grpo_guard/_C_build.json; }
clean
GRPO_GUARD_BUILD_CUDA=1 "$PY" -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
clean  # the universal wheel must not pick up the extension from build/
GRPO_GUARD_BUILD_CUDA=0 "$PY" -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
clean
ls -l "$OUT"/grpo_guard-*.whl
