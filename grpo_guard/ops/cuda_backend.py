"""The ``cuda`` backend: the csrc extension ``grpo_guard._C`` on CUDA tensors, with the reference's contract.

Kernels (csrc/sde_step.cu, csrc/policy_loss.cu) implement :mod:`grpo_guard.reference`; this module only
prepares their inputs and wires them into autograd:

- latent inputs share one storage dtype T in a kernel; where the caller mixes float32/bf16/fp16 they are upcast
  to float32 (exact), and a rollout's x' is still rounded to ``sample.dtype`` inside the kernel;
- compute-dtype (float32, float64 for float64) tensors: noise, old_prev_sample_mean, advantages, old_log_prob;
- sigmas: Python floats, or float64 (B,) tensors on the device; the per-sample coefficients are derived on the
  device in float64 exactly as :func:`reference.step_coefficients` derives them.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .. import reference as ref
from . import cuda_build
from . import errors
from .layout import samples_contiguous
from .requests import LossRequest, SDERequest, record_checked

_DYNAMICS = {"flow": 0, "dance": 1, "cps": 2}
_METHODS = {"grpo": 0, "mean_revised": 1, "ratio_norm": 2, "guard": 3, "dppo": 4}  # csrc/gg_kernels.h
_WEIGHTS = {"dt": 0, "beta_dt": 1}
_ROUND = {torch.float16: 2, torch.bfloat16: 3}  # gg_kernels.h GG_ROUND_*

_ext = None
_ext_error = None

# The second kernel set (csrc/gg_kernels.h): the vector element layout (each thread's elements contiguous, moved in
# 16-byte accesses), a rollout with return_mean=False that does not write the mean, and the device-side checks of
# validate=True made inside the kernels (errors.py; no torch ops around the launch). Opt-in with
# GRPO_GUARD_CUDA_V2=1 (or V2 = True) until the GPU test suite has passed with it; tested on the CPU through
# tests/cuda_emu. Read at each call (traced once under torch.compile). sde_step and policy_loss must run with the
# same setting for the on-policy log-ratio from old_log_prob to be exactly 0 (the layout fixes the order of sums).
V2 = os.environ.get("GRPO_GUARD_CUDA_V2", "0").strip() == "1"
# Within the second set, the single-launch forwards (csrc/gg_kernels.h): the last block of each sample finishes it
# and the last sample the batch, with no second launch (as the Triton backend's default forwards). On with V2;
# GRPO_GUARD_CUDA_V2_FUSED=0 (or V2_FUSED = False) keeps V2's two-launch forwards, to time the two apart.
V2_FUSED = os.environ.get("GRPO_GUARD_CUDA_V2_FUSED", "1").strip() != "0"
FLAG_VEC, FLAG_CHECK, FLAG_FUSED = 1, 2, 4  # csrc/binding.cpp: the `flags` argument


def _flags(req) -> int:
    if not V2:
        return 0
    return FLAG_VEC | (FLAG_CHECK if req.check else 0) | (FLAG_FUSED if V2_FUSED else 0)


def _prepare(req):
    """The device-side checks (validate=True): inside the kernels with V2, else torch ops before the launch."""
    return req if V2 else record_checked(req)


def _record(err, req) -> None:
    """Record the kernels' failed-check bits (V2) in the error word."""
    if err is not None and err.numel():
        errors.record(err, req.model_output.device)


def _load():
    """The compiled module, or None with the reason kept for unsupported_reason. An extension built for another
    torch (major.minor) or CUDA major is not imported at all (:mod:`.cuda_build`): its reason is one line."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        info = cuda_build.build_info()
        mismatch = cuda_build.runtime_mismatch(info, torch.__version__, torch.version.cuda)
        if mismatch is not None:
            _ext_error = f"grpo_guard._C {mismatch}"
            return None
        try:
            from .. import _C
            _ext = _C
        except (ImportError, OSError) as exc:
            absent = isinstance(exc, ImportError) and ("No module named" in str(exc)
                                                       or "cannot import name '_C'" in str(exc))
            if info is None and absent:
                _ext_error = ("grpo_guard._C is not built (the pure-Python install); install the wheel for your "
                              "torch / CUDA or build from source: GRPO_GUARD_BUILD_CUDA=1 pip install "
                              "--no-build-isolation .")
            else:
                _ext_error = f"grpo_guard._C ({cuda_build.describe(info)}) does not load: {type(exc).__name__}: {exc}"
    return _ext


def unsupported_reason(device):
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got {device}"
    if _load() is None:
        return _ext_error
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return _arch_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch_reason(index: int):
    """Whether the extension has code for GPU ``index`` (asked once per device: dispatch asks at every call)."""
    return cuda_build.arch_mismatch(cuda_build.build_info(), torch.cuda.get_device_capability(index))


def status() -> str:
    """One line for grpo-guard info: what the extension was built for and whether it loads under this torch."""
    if _load() is None:
        return f"not loaded: {_ext_error}"
    return f"grpo_guard._C loaded, built for {cuda_build.describe(cuda_build.build_info())}"


def _schedule(req):
    """Positional schedule arguments of the _C functions: sigma, sigma_next (float64 (B,) or None), their
    float values otherwise, eta, sin(eta*pi/2) (as reference.step_coefficients computes it), dynamics code."""
    sig, nxt = req.sigma, req.sigma_next
    device = req.model_output.device
    if isinstance(sig, torch.Tensor):
        sig_t = sig.to(device=device, dtype=torch.float64).contiguous()
        nxt_t = nxt.to(device=device, dtype=torch.float64).contiguous()
        sig_v = nxt_v = 0.0
    else:
        sig_t = nxt_t = None
        sig_v, nxt_v = float(sig), float(nxt)
    eta = float(req.noise_level)
    return (sig_t, nxt_t, sig_v, nxt_v, eta, math.sin(eta * math.pi / 2.0), _DYNAMICS[req.dynamics])


def _storage(*tensors):
    """Latents in one storage dtype (float32 if the given ones differ; a copy then), each sample contiguous (any
    batch stride is read in place; other layouts are copied); None stays None."""
    dtypes = {t.dtype for t in tensors if t is not None}
    common = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return [None if t is None else _rows(t.to(common)) for t in tensors], common


def _rows(t):
    return t if samples_contiguous(t) else t.contiguous()


def _c(t):
    return None if t is None else t.contiguous()


def _need_mean(req: SDERequest, flags: int) -> bool:
    """The strided layout always writes the mean; the vector one only when it is returned or a backward may need
    it (its gradient of log p reads the mean)."""
    grad = torch.is_grad_enabled() and (req.model_output.requires_grad or req.sample.requires_grad)
    return not flags & FLAG_VEC or req.return_mean or grad


class _SDEStepFn(torch.autograd.Function):
    """(v, x, prev|None, noise|None) -> (log_prob, mean|None, std_dev_t, prev_out|None, error bits|None); see
    csrc/sde_step.cu."""

    @staticmethod
    def forward(ctx, v, x, prev, noise, sched, round_mode, need_mean, flags):
        log_prob, mean, std_dev_t, prev_out, err = _ext.sde_forward(v, x, prev, noise, *sched, round_mode,
                                                                    need_mean, flags)
        ctx.set_materialize_grads(False)
        ctx.sched, ctx.flags = sched, flags
        ctx.save_for_backward(prev if prev is not None else prev_out, mean)
        ctx.mark_non_differentiable(*(t for t in (std_dev_t, err) if t is not None))
        return log_prob, mean, std_dev_t, prev_out, err

    @staticmethod
    def backward(ctx, g_logp, g_mean, _g_std, g_prev, _g_err):
        xp, mean = ctx.saved_tensors
        need_v, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_v or need_x) or (g_logp is None and g_mean is None and g_prev is None):
            return (None,) * 8
        gv, gx = _ext.sde_backward(_c(g_mean), _c(g_prev), _c(g_logp), xp, mean, need_v, need_x, *ctx.sched,
                                   ctx.flags)
        return (gv, gx) + (None,) * 6


def _sde_inputs(req: SDERequest):
    """(v, x, prev | None, noise | None, schedule, round_mode, need_mean, flags) as the kernels take them."""
    sample, prev = req.sample, req.prev_sample
    cd = ref.compute_dtype(req.model_output, sample, prev)
    (v, x, p), storage = _storage(req.model_output, sample, prev)
    rollout = prev is None
    round_mode = _ROUND.get(sample.dtype, 0) if rollout and storage != sample.dtype else 0
    noise = _rows(req.noise.to(cd)) if rollout else None
    flags = _flags(req)
    return v, x, p, noise, _schedule(req), round_mode, _need_mean(req, flags), flags


def sde_step(req: SDERequest) -> ref.SDEStep:
    req = _prepare(req)
    log_prob, mean, std_dev_t, prev_out, err = _SDEStepFn.apply(*_sde_inputs(req))
    _record(err, req)
    prev_out = prev_out.to(req.sample.dtype) if req.prev_sample is None else req.prev_sample
    return ref.SDEStep(prev_out, log_prob, mean if req.return_mean else None, std_dev_t)


class _PolicyLossFn(torch.autograd.Function):
    """(v, ...) -> (loss, stats (4,), log_ratio, bias|None, error bits|None); gradient w.r.t. v only; see
    csrc/policy_loss.cu."""

    @staticmethod
    def forward(ctx, v, x, prev, mu_old, v_old, adv, old_logp, sched, cfg):
        loss, stats, log_ratio, bias, coefs, err = _ext.loss_forward(v, x, prev, mu_old, v_old, adv, old_logp,
                                                                     *sched, *cfg)
        ctx.set_materialize_grads(False)
        ctx.sched, ctx.flags = sched, cfg[-1]
        ctx.save_for_backward(v, x, prev, mu_old, v_old, coefs)
        ctx.mark_non_differentiable(*(t for t in (stats, log_ratio, bias, err) if t is not None))
        return loss, stats, log_ratio, bias, err

    @staticmethod
    def backward(ctx, g_loss, *_):
        if g_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 9
        v, x, prev, mu_old, v_old, coefs = ctx.saved_tensors
        grad_v = _ext.loss_backward(v, x, prev, mu_old, v_old, coefs, g_loss.reshape(1).contiguous(), *ctx.sched,
                                    ctx.flags)
        return (grad_v,) + (None,) * 8


def _loss_inputs(req: LossRequest):
    """(v, x, prev, mu_old | None, v_old | None, adv, old_logp | None, schedule, config) as the kernels take them."""
    mu_old, v_old = req.old_prev_sample_mean, req.old_model_output
    cd = ref.compute_dtype(req.model_output, req.sample, req.prev_sample, mu_old, v_old)
    (v, x, prev, v_old), _ = _storage(req.model_output, req.sample, req.prev_sample, v_old)
    mu_old = None if mu_old is None else _rows(mu_old.to(cd))
    flags = _flags(req)
    old_logp = None  # the loss reads it without an old mean; the in-kernel checks check it wherever it is given
    if req.old_log_prob is not None and ((mu_old is None and v_old is None) or flags & FLAG_CHECK):
        old_logp = req.old_log_prob.to(cd).contiguous()
    adv = req.advantages.detach().to(cd).contiguous()
    lo, hi = ref.clip_bounds(req.clip_range)
    cfg = (_METHODS[req.method], lo, hi, float(req.adv_clip_max), _WEIGHTS[req.guard_weight], float(req.kl_threshold),
           flags)
    return v, x, prev, mu_old, v_old, adv, old_logp, _schedule(req), cfg


def _stats(loss, packed, log_ratio, bias):
    stats = {"ratio_mean": packed[0], "ratio_std": packed[1], "clipfrac": packed[2], "approx_kl": packed[3],
             "log_ratio": log_ratio}
    if bias is not None:
        stats["bias"] = bias
    if packed.shape[0] > 4:  # dppo
        stats.update({k: packed[4 + i] for i, k in enumerate(ref.DPPO_STATS)})
    return loss, stats


def policy_loss(req: LossRequest):
    req = _prepare(req)
    loss, packed, log_ratio, bias, err = _PolicyLossFn.apply(*_loss_inputs(req))
    _record(err, req)
    return _stats(loss, packed, log_ratio, bias)


# ---- the torch.library operators (csrc/binding.cpp: grpo_guard::sde_step_cuda, policy_loss_cuda, *_backward):
# fake implementations and autograd formulas, and the compiled path (grpo_guard/ops/library.py) --------------------

def _fake_bits(like, flags):
    return like.new_empty((1,) if flags & FLAG_CHECK else (0,), dtype=torch.int32)


def register_operators():
    """Fake implementations and autograd formulas of the extension's operators (once the extension is loaded)."""
    lib = torch.library

    @lib.register_fake("grpo_guard::sde_step_cuda")
    def _(v, x, prev, noise, sigma, sigma_next, sv, snv, eta, sin, dyn, round_mode, need_mean=True, flags=0):
        B, cd = v.shape[0], ref.compute_dtype(v)
        return (v.new_empty((B,), dtype=cd), v.new_empty(v.shape if need_mean else (0,), dtype=cd),
                v.new_empty((B,), dtype=cd), v.new_empty(v.shape if prev is None else (0,)), _fake_bits(v, flags))

    @lib.register_fake("grpo_guard::sde_step_cuda_backward")
    def _(g_mean, g_prev, g_logp, prev, mean, need_v, need_x, *sched):
        shape = tuple(prev.shape)
        return prev.new_empty(shape if need_v else (0,)), prev.new_empty(shape if need_x else (0,))

    @lib.register_fake("grpo_guard::policy_loss_cuda")
    def _(v, x, prev, mu_old, v_old, adv, old_logp, *rest):
        B, cd = v.shape[0], ref.compute_dtype(v)
        has_bias = mu_old is not None or v_old is not None
        n_stats = 4 + len(ref.DPPO_STATS) if rest[7] == _METHODS["dppo"] else 4  # rest[7]: method
        flags = rest[13] if len(rest) > 13 else 0
        return (v.new_empty((), dtype=cd), v.new_empty((n_stats,), dtype=cd), v.new_empty((B,), dtype=cd),
                v.new_empty((B if has_bias else 0,), dtype=cd), v.new_empty((B, 2), dtype=cd), _fake_bits(v, flags))

    @lib.register_fake("grpo_guard::policy_loss_cuda_backward")
    def _(v, *rest):
        return v.new_empty(v.shape)

    def sde_setup(ctx, inputs, output):
        v, x, prev, noise, sigma, sigma_next, sv, snv, eta, sin, dyn, round_mode = inputs[:12]
        ctx.set_materialize_grads(False)
        ctx.rollout = prev is None
        ctx.save_for_backward(output[3] if ctx.rollout else prev, output[1], sigma, sigma_next)
        ctx.sched = (sv, snv, eta, sin, dyn)
        ctx.flags = inputs[13] if len(inputs) > 13 else 0

    def sde_backward(ctx, g_logp, g_mean, _g_std, g_prev, _g_err):
        xp, mean, sigma, sigma_next = ctx.saved_tensors
        need_v, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_prev = g_prev if ctx.rollout else None
        if not (need_v or need_x) or (g_logp is None and g_mean is None and g_prev is None):
            return (None,) * 14
        gv, gx = torch.ops.grpo_guard.sde_step_cuda_backward(_c(g_mean), _c(g_prev), _c(g_logp), xp, mean, need_v,
                                                             need_x, sigma, sigma_next, *ctx.sched, ctx.flags)
        return (gv if need_v else None, gx if need_x else None) + (None,) * 12

    lib.register_autograd("grpo_guard::sde_step_cuda", sde_backward, setup_context=sde_setup)

    def loss_setup(ctx, inputs, output):
        v, x, prev, mu_old, v_old, adv, old_logp, sigma, sigma_next, sv, snv, eta, sin, dyn = inputs[:14]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(v, x, prev, mu_old, v_old, output[4], sigma, sigma_next)
        ctx.sched = (sv, snv, eta, sin, dyn)
        ctx.flags = inputs[20] if len(inputs) > 20 else 0

    def loss_backward(ctx, g_loss, *_):
        if g_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 21
        v, x, prev, mu_old, v_old, coefs, sigma, sigma_next = ctx.saved_tensors
        grad_v = torch.ops.grpo_guard.policy_loss_cuda_backward(v, x, prev, mu_old, v_old, coefs,
                                                                g_loss.reshape(1).contiguous(), sigma, sigma_next,
                                                                *ctx.sched, ctx.flags)
        return (grad_v,) + (None,) * 20

    lib.register_autograd("grpo_guard::policy_loss_cuda", loss_backward, setup_context=loss_setup)


def sde_step_compiled(req: SDERequest) -> ref.SDEStep:
    """sde_step through ``torch.ops.grpo_guard.sde_step_cuda`` (the torch.compile path)."""
    req = _prepare(req)
    v, x, p, noise, sched, round_mode, need_mean, flags = _sde_inputs(req)
    log_prob, mean, std_dev_t, prev_out, err = torch.ops.grpo_guard.sde_step_cuda(v, x, p, noise, *sched,
                                                                                  round_mode, need_mean, flags)
    _record(err, req)
    prev_out = prev_out.to(req.sample.dtype) if req.prev_sample is None else req.prev_sample
    return ref.SDEStep(prev_out, log_prob, mean if req.return_mean else None, std_dev_t)


def policy_loss_compiled(req: LossRequest):
    """policy_loss through ``torch.ops.grpo_guard.policy_loss_cuda`` (the torch.compile path)."""
    req = _prepare(req)
    v, x, prev, mu_old, v_old, adv, old_logp, sched, cfg = _loss_inputs(req)
    loss, packed, log_ratio, bias, _, err = torch.ops.grpo_guard.policy_loss_cuda(v, x, prev, mu_old, v_old, adv,
                                                                                  old_logp, *sched, *cfg)
    _record(err, req)
    return _stats(loss, packed, log_ratio, bias if bias.numel() else None)
