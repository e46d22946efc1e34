"""Every Triton kernel compiles to a real sm_90 cubin on this machine, no GPU needed (issue #2, compile checks).

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process when there is no
GPU, and Triton decides interpreted vs compiled when the kernels are decorated), through a fresh Triton cache
so every variant is really compiled. One subprocess per input dtype the kernels are specialized for.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
H100_SHARED = 227 * 1024


def kernel_names():
    """Names of the launchable kernels (``*_kernel``) in grpo_guard.kernels' modules, read from source so this
    process's interpreter-mode decoration does not matter."""
    from grpo_guard import kernels
    names = set()
    for mod in ("sde_step", "policy_loss"):
        path = os.path.join(os.path.dirname(kernels.__file__), f"{mod}.py")
        for line in open(path):
            if line.startswith("def ") and "_kernel(" in line:
                names.add(line[4:line.index("(")])
    return names


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp64"])
def test_kernels_compile_to_sm90(dtype, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    args = [sys.executable, os.path.join(HERE, "_compile_kernels.py"), dtype] + (["--full"] if dtype == "fp32" else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and rows, proc.stderr[-3000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']}[{r['variant']}]:\n{r['error']}" for r in failed)
    for r in rows:
        assert r["sm90"] and r["cubin_bytes"] > 0, r
        assert r["shared"] <= H100_SHARED, r
        if not r["kernel"].endswith("_finish_kernel"):  # latent-sized streams: 16-byte loads, not scalar ones
            assert r["vector_loads"] > 0, r
    assert {r["kernel"] for r in rows} == kernel_names()
    lean = [r for r in rows if r["variant"].startswith("lean-")]
    assert len(lean) == 5, lean
    if "regs" in lean[0] and dtype in ("bf16", "fp16"):  # (cuobjdump found) the lean forwards of 16-bit latents
        # fit the register cap without spilling
        from grpo_guard.ops.triton_launch import LEAN_MAXNREG
        for r in lean:
            if r["kernel"].endswith("_fwd_kernel"):
                assert r["regs"] <= LEAN_MAXNREG and r["local"] == 0 and r["stack"] == 0, r


def test_must_match_arithmetic_is_never_contracted(tmp_path):
    """torch.compile launches user Triton kernels with FMA contraction enabled (it does not pass grpo_guard's
    enable_fp_fusion=False): the arithmetic that makes the on-policy ratio exactly 1 (mu, the squared-deviation
    sums, x' = mu + s z, log p, the cps coefficients) is explicitly rounded, so contraction adds no FMA to it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_compile_kernels.py"), "--fusion-probe"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(rows) == 2, proc.stderr[-3000:]
    assert all(r["fma_added_by_fusion"] == 0 for r in rows), rows
