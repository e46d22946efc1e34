"""Compile every Triton kernel of grpo_guard to an sm_90 cubin, no GPU needed (not a test module).

Run as ``python tests/_compile_kernels.py DTYPE`` with TRITON_INTERPRET unset (the kernels must be decorated
as compiled JITFunctions); prints one JSON line per (kernel, variant): ok, cubin bytes, shared memory,
vectorized global loads, error.
DTYPE is the latent inputs' dtype (fp32, bf16, fp16, fp64); the compute dtype follows (fp64 for fp64, else fp32).
"""
import inspect
import json
import os
import sys
import tempfile
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget

from grpo_guard.kernels import policy_loss as PL
from grpo_guard.kernels import sde_step as SDE
from grpo_guard.ops.triton_launch import LEAN_MAXNREG, lean_caps_registers

TARGET = GPUTarget("cuda", 90, 32)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
BLOCK, LOG_BLOCK, CP, LOG_CP, RB = 1024, 10, 64, 6, 8
OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}  # what the wrappers launch with
# the single-launch kernels at their wan_480p geometry (triton_launch.fused_geometry: 2048 x 1, 1024 chunks, 4 warps)
FUSED = dict(BLOCK=2048, LOG_BLOCK=11, ITERS=1)
FUSED_FINISH = dict(CP=1024, LOG_CP=10)
FUSED_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


def pointer_types(T, CD):
    """Element type of every pointer argument, by name."""
    return {"v_ptr": T, "x_ptr": T, "xp_ptr": T, "xp_out_ptr": T, "z_ptr": CD, "mean_ptr": CD, "part_ptr": CD,
            "log_prob_ptr": CD, "std_dev_t_ptr": CD, "g_prev_ptr": T, "g_mean_ptr": CD, "g_lp_ptr": CD,
            "g_v_ptr": T, "g_x_ptr": T, "sig_ptr": "fp64", "nxt_ptr": "fp64", "adv_ptr": "fp32",
            "old_lp_ptr": CD, "coef_ptr": CD, "loss_ptr": CD, "stats_ptr": CD, "g_loss_ptr": CD, "row_ptr": CD,
            "cnt_ptr": "i32", "err_ptr": "i32"}


def variants(T, full):
    """(kernel, label, constexprs, extra pointer types, options). ``full``: every OLD/METHOD/dynamics variant
    too."""
    for kernel, label, constexprs, extra in split_variants(T, full):
        yield kernel, label, constexprs, extra, OPTIONS
    for kernel, label, constexprs, extra in fused_variants(T, full):
        yield kernel, label, constexprs, extra, FUSED_OPTIONS
    for kernel, label, constexprs, extra in lean_variants(T):
        fwd = kernel.__name__.endswith("_fwd_kernel")
        capped = fwd and lean_caps_registers([TORCH_DTYPES[T]])  # as triton_launch.forward_options decides
        yield kernel, label, constexprs, extra, dict(FUSED_OPTIONS, maxnreg=LEAN_MAXNREG) if capped else FUSED_OPTIONS


def lean_variants(T):
    """The opt-in lean variant (triton_launch.LEAN) of the single-launch kernels at the wan_480p geometry: the
    forwards as the benchmarks run them (rollout, scoring with the mean; policy_loss guard with old_model_output),
    launched with the register cap; the backwards (the hardware bf16 rounding of the gradients)."""
    fused = dict(FUSED, **FUSED_FINISH)
    for rollout, mean in ((True, False), (False, True)):
        yield SDE.sde_step_fwd_kernel, f"lean-rollout{int(rollout)}-mean{int(mean)}", dict(
            DYNAMICS=0, PER_SAMPLE=True, ROLLOUT=rollout, WRITE_MEAN=mean, CHECK=True, ERR_BASE=0, LEAN=True,
            **fused), {}
    yield SDE.sde_step_bwd_kernel, "lean-mean0-glp1", dict(
        HAS_MEAN=False, HAS_G_PREV=True, HAS_G_MEAN=False, HAS_G_LP=True, NEED_G_V=True, NEED_G_X=True,
        BLOCK=FUSED["BLOCK"], ITERS=FUSED["ITERS"], LEAN=True), {}
    yield PL.policy_loss_fwd_kernel, "lean-old2-method4", dict(
        DYNAMICS=0, PER_SAMPLE=True, OLD=2, METHOD=4, BETA_DT=False, CHECK=True, ERR_BASE=2, RB=16, LOG_RB=4,
        LEAN=True, ONE_TILE=True, **fused), {"old_ptr": T}
    yield PL.policy_loss_bwd_kernel, "lean-old2-delta1", dict(
        OLD=2, NEED_DELTA=True, BLOCK=FUSED["BLOCK"], ITERS=FUSED["ITERS"], LEAN=True), {"old_ptr": T}


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory (spills) of a cubin, from cuobjdump (shipped with Triton's NVIDIA
    backend); {} when no cuobjdump is found."""
    import glob
    import re
    import shutil
    import subprocess
    tool = shutil.which("cuobjdump") or next(iter(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                                                          "nvidia", "bin", "cuobjdump"))), None)
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", out)
    return {} if m is None else {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}


def fused_variants(T, full):
    """The single-launch forwards and their elementwise backwards."""
    CD = "fp64" if T == "fp64" else "fp32"
    dyns = (0, 1, 2) if full else (0,)
    for dyn in dyns:
        for rollout, mean in ((True, False), (True, True), (False, True)) if full or dyn == 0 else ((True, False),):
            yield SDE.sde_step_fwd_kernel, f"dyn{dyn}-rollout{int(rollout)}-mean{int(mean)}", dict(
                DYNAMICS=dyn, PER_SAMPLE=True, ROLLOUT=rollout, WRITE_MEAN=mean, CHECK=True, ERR_BASE=0, **FUSED,
                **FUSED_FINISH), {}
    for has_mean in (True, False):
        for g_lp in (True, False):  # rollouts differentiate prev_sample alone: no log-prob gradient
            yield SDE.sde_step_bwd_kernel, f"mean{int(has_mean)}-glp{int(g_lp)}", dict(
                HAS_MEAN=has_mean, HAS_G_PREV=True, HAS_G_MEAN=has_mean, HAS_G_LP=g_lp, NEED_G_V=True,
                NEED_G_X=True, BLOCK=FUSED["BLOCK"], ITERS=FUSED["ITERS"]), {}
    for old in (0, 1, 2) if full else (2,):
        old_ty = {"old_ptr": CD if old == 1 else T}
        methods = (0,) if old == 0 else ((0, 1, 2, 3, 4) if full else (3, 4))
        for method in methods:
            for dyn in (dyns if method in (0, 3, 4) else (0,)):
                yield PL.policy_loss_fwd_kernel, f"old{old}-method{method}-dyn{dyn}", dict(
                    DYNAMICS=dyn, PER_SAMPLE=not full or dyn != 2, OLD=old, METHOD=method, BETA_DT=method == 3,
                    CHECK=True, ERR_BASE=2, RB=16, LOG_RB=4, **FUSED, **FUSED_FINISH), old_ty
        for need_delta in ((False, True) if old else (False,)):
            yield PL.policy_loss_bwd_kernel, f"old{old}-delta{int(need_delta)}", dict(
                OLD=old, NEED_DELTA=need_delta, BLOCK=FUSED["BLOCK"], ITERS=FUSED["ITERS"]), old_ty


def split_variants(T, full):
    """The split forwards (reduce + finish) and their backwards."""
    CD = "fp64" if T == "fp64" else "fp32"
    geo = dict(BLOCK=BLOCK, LOG_BLOCK=LOG_BLOCK)
    fin = dict(RB=RB, CP=CP, LOG_CP=LOG_CP)
    dyns = (0, 1, 2) if full else (0,)
    for dyn in dyns:
        for rollout in (True, False):
            yield SDE.sde_step_reduce_kernel, f"dyn{dyn}-rollout{int(rollout)}", dict(
                DYNAMICS=dyn, PER_SAMPLE=True, ROLLOUT=rollout, **geo), {}
        yield SDE.sde_step_finish_kernel, f"dyn{dyn}", dict(DYNAMICS=dyn, PER_SAMPLE=True, CHECK=True, ERR_BASE=0,
                                                            **fin), {}
        for g_lp in (True, False):
            yield SDE.sde_step_backward_kernel, f"dyn{dyn}-glp{int(g_lp)}", dict(
                DYNAMICS=dyn, PER_SAMPLE=True, HAS_G_PREV=True, HAS_G_MEAN=True, HAS_G_LP=g_lp, NEED_G_V=True,
                NEED_G_X=True, BLOCK=BLOCK), {}
    olds = (0, 1, 2) if full else (1,)
    for old in olds:
        old_ty = {"old_ptr": CD if old == 1 else T}
        methods = (0,) if old == 0 else ((0, 1, 2, 3, 4) if full else (0, 4))
        yield PL.policy_loss_reduce_kernel, f"old{old}", dict(
            DYNAMICS=0, PER_SAMPLE=True, OLD=old, **geo), old_ty
        for method in methods:
            for dyn in (dyns if method in (0, 4) else (0,)):
                yield PL.policy_loss_finish_kernel, f"old{old}-method{method}-dyn{dyn}", dict(
                    DYNAMICS=dyn, PER_SAMPLE=not full or dyn != 2, OLD=old, METHOD=method,
                    BETA_DT=method == 3, CHECK=True, ERR_BASE=2, **fin), old_ty
        for need_delta in ((False, True) if old else (False,)):
            yield PL.policy_loss_backward_kernel, f"old{old}-delta{int(need_delta)}", dict(
                DYNAMICS=0, PER_SAMPLE=True, OLD=old, NEED_DELTA=need_delta, BLOCK=BLOCK), old_ty


def signature(kernel, T, constexprs, extra):
    CD = "fp64" if T == "fp64" else "fp32"
    ptrs = dict(pointer_types(T, CD), **extra)
    sig = {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs[name]
        elif kernel.params[i].annotation_type:
            sig[name] = kernel.params[i].annotation_type
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, T, constexprs, extra, options=OPTIONS):
    """As a launch specializes it: pointers 16-byte aligned, D and the batch strides multiples of 16 (the SPEC §7
    shapes), which is what lets the loads vectorize; a constexpr left out takes its default, as at a launch (not
    a runtime argument: a constexpr branch such as LEAN would compile both ways)."""
    constexprs = dict({p.name: p.default for p in kernel.params
                       if p.is_constexpr and p.default is not inspect.Parameter.empty}, **constexprs)
    sig = signature(kernel, T, constexprs, extra)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if sig[name].startswith("*") or name in ("D", "sv", "sx", "sxp", "so", "sz")}
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    except (AssertionError, TypeError, KeyError):  # older layouts key constexprs by argument index
        idx = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=idx, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def main(T, full):
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="grpo_guard_triton_cache_"))
    for kernel, label, constexprs, extra, options in variants(T, full):
        row = {"kernel": kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), "variant": label}
        try:
            c = compile_one(kernel, T, constexprs, extra, options)
            ptx = c.asm["ptx"]
            row.update(ok=True, cubin_bytes=len(c.asm["cubin"]), shared=int(c.metadata.shared),
                       sm90=".target sm_90" in ptx, vector_loads=ptx.count("ld.global.v"),
                       **resource_usage(c.asm["cubin"]))
        except Exception:  # reported, the test fails on it
            row.update(ok=False, error=traceback.format_exc(limit=3)[-2000:])
        print(json.dumps(row), flush=True)




def fusion_probe():
    """Compile the arithmetic that must match across kernels (transition_mean, accumulate_sq_dev, the rollout's
    x' = mu + s z, log_prob_from_sum, the cps coefficients) in a probe kernel with FMA contraction enabled (as a
    torch.compile launch would) and disabled (grpo_guard's own launches), and print how many FMAs the contraction
    added (none may be: the result must not depend on the launcher's enable_fp_fusion)."""
    import triton.language as tl
    from grpo_guard.kernels import common as C

    @triton.jit
    def probe(x_ptr, v_ptr, xp_ptr, z_ptr, out_ptr, sig, nxt, eta, D, BLOCK: tl.constexpr, CPS_DYN: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        v = tl.load(v_ptr + offs, mask=m, other=0.0)
        xp = tl.load(xp_ptr + offs, mask=m, other=0.0)
        z = tl.load(z_ptr + offs, mask=m, other=0.0)
        _, std, a64, b64, _, _ = C.step_coefficients(sig + tl.zeros([], tl.float64), nxt + tl.zeros([], tl.float64),
                                                     eta, CPS_DYN)
        a, b, s = a64.to(tl.float32), b64.to(tl.float32), std.to(tl.float32)
        mu = C.transition_mean(x, v, a, b)
        x_new = C.add_rn(mu, C.mul_rn(s, z))
        acc = C.accumulate_sq_dev(tl.zeros([BLOCK], tl.float32), xp, mu, m)
        lp = C.log_prob_from_sum(C.tree_sum(acc, 10), D, s, CPS_DYN)
        tl.store(out_ptr + offs, x_new + lp, mask=m)

    for dyn in (0, 2):
        sig = {"x_ptr": "*fp32", "v_ptr": "*fp32", "xp_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*fp32",
               "sig": "fp64", "nxt": "fp64", "eta": "fp64", "D": "i32", "BLOCK": "constexpr", "CPS_DYN": "constexpr"}
        src = triton.compiler.ASTSource(fn=probe, signature=sig, constexprs={"BLOCK": 1024, "CPS_DYN": dyn})
        ptx = [triton.compile(src, target=TARGET, options={"num_warps": 4, "enable_fp_fusion": f}).asm["ptx"]
               for f in (True, False)]
        fmas = [p.count("fma.") for p in ptx]  # (the log's own implementation has some either way)
        print(json.dumps({"probe": f"dyn{dyn}", "fma_added_by_fusion": fmas[0] - fmas[1]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--fusion-probe":
        fusion_probe()
    else:
        main(sys.argv[1], "--full" in sys.argv[2:])
