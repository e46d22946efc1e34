"""The ops as PyTorch operators (``torch.ops.grpo_guard.*``), for torch.compile, torch.export and CUDA graphs.

One operator pair (forward, backward) per op and backend, each with a fake (meta) implementation and its autograd
formula registered (``torch.library.register_autograd``):

- ``grpo_guard::sde_step_triton`` / ``policy_loss_triton`` (+ ``*_backward``): ``torch.library.triton_op`` with
  ``wrap_triton`` launches, so the compiler sees the Triton kernels themselves; under the Triton interpreter (CPU
  testing) the same functions are opaque ``custom_op``\\ s with a fake implementation that allocates the outputs.
  The kernel set (single-launch or split, ``triton_launch.FUSED``) is fixed when the caller is traced.
- ``grpo_guard::sde_step_torch`` / ``policy_loss_torch``: ``CompositeImplicitAutograd`` operators that decompose
  into the reference's torch ops (autograd and fake tensors come from the decomposition).
- ``grpo_guard::sde_step_cuda`` / ``policy_loss_cuda``: the CUDA extension's operators (``TORCH_LIBRARY`` in
  csrc/binding.cpp), registered with fake implementations and autograd here when the extension is built.

Eager calls of :func:`grpo_guard.sde_step` / :func:`grpo_guard.policy_loss` do not go through the operators
(the Python custom-op dispatcher costs about 50 us per call; they call the same launch functions through an
autograd.Function). Under torch.compile (``torch.compiler.is_compiling()``) they call these operators: no graph
break, and per-sample values (tensor sigmas, advantages) are graph inputs, so a new timestep does not recompile.

Output conventions: operators cannot return None, so absent outputs (x' when scoring, the mean when not asked
for, the bias without an old mean) are empty tensors; ``work`` is the opaque per-row state the backward reads.
"""
from typing import Optional, Tuple  # no "from __future__ import annotations": infer_schema reads these

import torch
from torch import Tensor

from .. import reference as ref
from . import errors, layout, requests

# ------------------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------------------

try:
    from . import triton_launch as TL
    from . import triton_policy_loss as TPL
    from . import triton_sde_step as TSDE
    _TRITON = True
except Exception:  # noqa: BLE001  (no triton: the torch operators remain)
    _TRITON = False


def _with_error_bits(forward, *args, launch, **kwargs):
    """``forward``'s outputs and, last, the error bits its kernels set (a fresh int32 (1,) zero tensor: operators
    with an autograd formula cannot mutate an input, so the caller ORs these into the error word)."""
    err = torch.zeros(1, dtype=torch.int32, device=args[1].device)
    return tuple(forward(*args, None, err, launch=launch, **kwargs)) + (err,)


_LAUNCH = [None]  # the launcher of the registered Triton operators (set by _register_triton_ops)


# The operators' signatures (their schemas are inferred from these annotations).

def sde_step_triton_op(v: Tensor, x: Tensor, prev_sample: Optional[Tensor], noise: Optional[Tensor],
                       sigma: Optional[Tensor], sigma_next: Optional[Tensor], sigma_value: float,
                       sigma_next_value: float, noise_level: float, dynamics: str, return_mean: bool, check: bool,
                       fused: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (x' or empty, log_prob, mean or empty, std_dev_t, work, error bits)."""
    return _with_error_bits(TSDE.forward, v, x, prev_sample, noise, sigma, sigma_next, sigma_value,
                            sigma_next_value, noise_level, dynamics, return_mean, check, fused, launch=_LAUNCH[0])


def sde_step_triton_backward_op(g_prev: Optional[Tensor], g_lp: Optional[Tensor], g_mean: Optional[Tensor],
                                v: Optional[Tensor], x: Optional[Tensor], xp: Tensor, mean: Optional[Tensor],
                                work: Tensor, sigma: Optional[Tensor], sigma_next: Optional[Tensor],
                                sigma_value: float, sigma_next_value: float, noise_level: float, dynamics: str,
                                fused: bool, v_dtype: Optional[torch.dtype],
                                x_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """-> (grad of v or empty, grad of x or empty)."""
    g_v, g_x = TSDE.backward(g_prev, g_lp, g_mean, v, x, xp, mean, work, sigma, sigma_next, sigma_value,
                             sigma_next_value, noise_level, dynamics, fused, v_dtype, x_dtype, launch=_LAUNCH[0])
    return (g_v if g_v is not None else xp.new_empty((0,))), (g_x if g_x is not None else xp.new_empty((0,)))


def policy_loss_triton_op(v: Tensor, x: Tensor, prev_sample: Tensor, old: Optional[Tensor], advantages: Tensor,
                          old_log_prob: Optional[Tensor], sigma: Optional[Tensor], sigma_next: Optional[Tensor],
                          sigma_value: float, sigma_next_value: float, noise_level: float, dynamics: str,
                          method: str, clip_range: float, adv_clip_max: float, guard_weight: str, old_kind: int,
                          check: bool, fused: bool, kl_threshold: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, stats (layout.n_stats), work, error bits)."""
    return _with_error_bits(TPL.forward, v, x, prev_sample, old, advantages, old_log_prob, sigma, sigma_next,
                            sigma_value, sigma_next_value, noise_level, dynamics, method, clip_range, adv_clip_max,
                            guard_weight, old_kind, check, fused, launch=_LAUNCH[0], kl_threshold=kl_threshold)


def policy_loss_triton_backward_op(g_loss: Tensor, v: Optional[Tensor], x: Optional[Tensor], prev_sample: Tensor,
                                   old: Optional[Tensor], work: Tensor, sigma: Optional[Tensor],
                                   sigma_next: Optional[Tensor], sigma_value: float, sigma_next_value: float,
                                   noise_level: float, dynamics: str, method: str, old_kind: int, fused: bool,
                                   v_dtype: torch.dtype) -> Tensor:
    """-> grad of v."""
    return TPL.backward(g_loss, v, x, prev_sample, old, work, sigma, sigma_next, sigma_value, sigma_next_value,
                        noise_level, dynamics, method, old_kind, fused, v_dtype, launch=_LAUNCH[0])


def _register_triton_ops():
    """Define the Triton operators: triton_op + wrap_triton on a GPU, custom_op + register_fake under the
    interpreter (wrap_triton cannot trace interpreted kernels; the fake allocates the outputs and launches
    nothing). Returns {name: op}."""
    fns = {"sde_step_triton": sde_step_triton_op, "sde_step_triton_backward": sde_step_triton_backward_op,
           "policy_loss_triton": policy_loss_triton_op, "policy_loss_triton_backward": policy_loss_triton_backward_op}
    ops = {}
    if TL.interpreted():
        _LAUNCH[0] = TPL.eager_launch
        for name, fn in fns.items():
            ops[name] = torch.library.custom_op(f"grpo_guard::{name}", mutates_args=())(fn)

            def fake(*args, fn=fn):
                _LAUNCH[0] = TPL.no_launch
                try:
                    return fn(*args)
                finally:
                    _LAUNCH[0] = TPL.eager_launch
            ops[name].register_fake(fake)
    else:
        from torch.library import triton_op, wrap_triton

        def launch(kernel, grid, *args, **kwargs):
            wrap_triton(kernel)[grid](*args, **kwargs)
        _LAUNCH[0] = launch
        for name, fn in fns.items():
            ops[name] = triton_op(f"grpo_guard::{name}", mutates_args=())(fn)
    ops["sde_step_triton"].register_autograd(_sde_backward, setup_context=_sde_setup)
    ops["policy_loss_triton"].register_autograd(_loss_backward, setup_context=_loss_setup)
    return ops


def _sde_setup(ctx, inputs, output):
    (v, x, prev_sample, noise, sigma, sigma_next, sigma_value, sigma_next_value, noise_level, dynamics,
     return_mean, check, fused) = inputs
    xp_out, _, mean, _, work, _ = output
    ctx.set_materialize_grads(False)
    keep_mean = mean.numel() > 0
    ctx.rollout = prev_sample is None
    ctx.save_for_backward(None if keep_mean else v, None if keep_mean else x, xp_out if ctx.rollout else prev_sample,
                          mean if keep_mean else None, work, sigma, sigma_next)
    ctx.args = (sigma_value, sigma_next_value, noise_level, dynamics, fused, v.dtype, x.dtype)


def _given(g):
    """A gradient that carries something (None, or an empty one for an absent output, carry nothing)."""
    return g if g is not None and g.numel() > 0 else None


def _sde_backward(ctx, g_xp, g_lp, g_mean, _g_std, _g_work, _g_err):
    v, x, xp, mean, work, sigma, sigma_next = ctx.saved_tensors
    sv, snv, eta, dynamics, fused, v_dtype, x_dtype = ctx.args
    need_v, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_xp, g_lp, g_mean = _given(g_xp) if ctx.rollout else None, _given(g_lp), _given(g_mean)
    if (g_xp is None and g_lp is None and g_mean is None) or not (need_v or need_x):
        return (None,) * 13
    g_v, g_x = torch.ops.grpo_guard.sde_step_triton_backward(
        g_xp, g_lp, g_mean, v, x, xp, mean, work, sigma, sigma_next, sv, snv, eta, dynamics, fused,
        v_dtype if need_v else None, x_dtype if need_x else None)
    return (g_v if need_v else None, g_x if need_x else None) + (None,) * 11


def _loss_setup(ctx, inputs, output):
    (v, x, prev_sample, old, advantages, old_log_prob, sigma, sigma_next, sigma_value, sigma_next_value,
     noise_level, dynamics, method, clip_range, adv_clip_max, guard_weight, old_kind, check, fused,
     _kl_threshold) = inputs
    ctx.set_materialize_grads(False)
    need_v, need_x, need_old = TPL.saved_inputs(old_kind, method)
    ctx.save_for_backward(v if need_v else None, x if need_x else None, prev_sample, old if need_old else None,
                          output[2], sigma, sigma_next)
    ctx.args = (sigma_value, sigma_next_value, noise_level, dynamics, method, old_kind, fused, v.dtype)


def _loss_backward(ctx, g_loss, _g_stats, _g_work, _g_err):
    if g_loss is None:
        return (None,) * 20
    v, x, xp, old, work, sigma, sigma_next = ctx.saved_tensors
    g_v = torch.ops.grpo_guard.policy_loss_triton_backward(g_loss, v, x, xp, old, work, sigma, sigma_next,
                                                            *ctx.args)
    return (g_v,) + (None,) * 19


TRITON_OPS = _register_triton_ops() if _TRITON else {}


def sde_step_triton(req: requests.SDERequest) -> ref.SDEStep:
    """sde_step through ``torch.ops.grpo_guard.sde_step_triton`` (the compiled path)."""
    sig_t, nxt_t, sig_f, nxt_f = TSDE.sigmas(req)
    xp_out, log_prob, mean, std_dev_t, _, err = torch.ops.grpo_guard.sde_step_triton(
        req.model_output, req.sample, req.prev_sample, req.noise, sig_t, nxt_t, sig_f, nxt_f, req.noise_level,
        req.dynamics, req.return_mean, req.check, TL.FUSED)
    errors.word(req.sample.device).bitwise_or_(err)
    return ref.SDEStep(xp_out if req.prev_sample is None else req.prev_sample, log_prob,
                       mean if req.return_mean else None, std_dev_t)


def policy_loss_triton(req: requests.LossRequest):
    """policy_loss through ``torch.ops.grpo_guard.policy_loss_triton`` (the compiled path)."""
    sig_t, nxt_t, sig_f, nxt_f = TSDE.sigmas(req)
    old, old_kind = TPL.old_input(req)
    loss, stats, _, err = torch.ops.grpo_guard.policy_loss_triton(
        req.model_output, req.sample, req.prev_sample, old, req.advantages, req.old_log_prob, sig_t, nxt_t, sig_f,
        nxt_f, req.noise_level, req.dynamics, req.method, req.clip_range, req.adv_clip_max, req.guard_weight,
        old_kind, req.check, TL.FUSED, req.kl_threshold)
    errors.word(req.sample.device).bitwise_or_(err)
    return loss, layout.stats_dict(stats, req.sample.shape[0], old_kind != 0, req.method)


# ------------------------------------------------------------------------------------------------------------
# torch (the reference): CompositeImplicitAutograd operators
# ------------------------------------------------------------------------------------------------------------

TORCH_SCHEMAS = {
    "sde_step_torch": "(Tensor v, Tensor x, Tensor? prev_sample, Tensor? noise, Tensor? sigma, Tensor? sigma_next, "
                      "float sigma_value, float sigma_next_value, float noise_level, str dynamics, bool return_mean, "
                      "bool check) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "policy_loss_torch": "(Tensor v, Tensor x, Tensor prev_sample, Tensor? old_log_prob, "
                         "Tensor? old_prev_sample_mean, Tensor? old_model_output, Tensor advantages, Tensor? sigma, "
                         "Tensor? sigma_next, float sigma_value, float sigma_next_value, float noise_level, "
                         "str dynamics, str method, float clip_range, float adv_clip_max, str guard_weight, "
                         "bool check, float kl_threshold) -> (Tensor, Tensor, Tensor)",
}



def _error_bits(code, like: Tensor) -> Tensor:
    """The ops' error-bits output, int32 (1,): ``code`` (requests.checked; None: nothing checked) or zeros."""
    if code is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    return code.to(torch.int32).reshape(1)


def _sde_step_torch(v, x, prev_sample, noise, sigma, sigma_next, sigma_value, sigma_next_value, noise_level,
                    dynamics, return_mean, check):
    """(x' or empty, log_prob, mean or empty, std_dev_t, error bits): reference.sde_step after the device-side
    checks (requests.checked: failed values become NaN)."""
    req = requests.SDERequest(v, x, sigma if sigma is not None else sigma_value,
                              sigma_next if sigma_next is not None else sigma_next_value, noise_level, dynamics,
                              prev_sample, noise, return_mean, check)
    req, code = requests.checked(req)
    out = ref.sde_step(v, x, req.sigma, req.sigma_next, noise_level=noise_level, dynamics=dynamics,
                       prev_sample=prev_sample, noise=noise)
    empty = x.new_empty((0,))
    return (out.prev_sample if prev_sample is None else empty, out.log_prob,
            out.prev_sample_mean if return_mean else empty.to(out.log_prob.dtype), out.std_dev_t,
            _error_bits(code, x))


def _policy_loss_torch(v, x, prev_sample, old_log_prob, old_prev_sample_mean, old_model_output, advantages, sigma,
                       sigma_next, sigma_value, sigma_next_value, noise_level, dynamics, method, clip_range,
                       adv_clip_max, guard_weight, check, kl_threshold):
    """(loss, stats packed as the Triton kernels pack them (4 + 2B: ratio_mean, ratio_std, clipfrac, approx_kl,
    log_ratio, bias (zeros without an old mean); "dppo" appends reference.DPPO_STATS: layout.n_stats), error
    bits)."""
    req = requests.LossRequest(v, x, prev_sample, sigma if sigma is not None else sigma_value,
                               sigma_next if sigma_next is not None else sigma_next_value, advantages, old_log_prob,
                               old_prev_sample_mean, old_model_output, noise_level, dynamics, method, clip_range,
                               adv_clip_max, guard_weight, check, kl_threshold)
    req, code = requests.checked(req)
    loss, st = ref.policy_loss(v, x, prev_sample, req.sigma, req.sigma_next, req.advantages,
                               **req.reference_kwargs())
    log_ratio = st["log_ratio"]
    bias = st.get("bias", torch.zeros_like(log_ratio))
    extra = [torch.stack([st[k] for k in ref.DPPO_STATS])] if method == "dppo" else []
    stats = torch.cat([torch.stack([st["ratio_mean"], st["ratio_std"], st["clipfrac"], st["approx_kl"]]),
                       log_ratio, bias, *extra]).detach()
    return loss, stats, _error_bits(code, x)


def _register_torch_ops():
    for name, fn in (("sde_step_torch", _sde_step_torch), ("policy_loss_torch", _policy_loss_torch)):
        torch.library.define(f"grpo_guard::{name}", TORCH_SCHEMAS[name])
        torch.library.impl(f"grpo_guard::{name}", "CompositeImplicitAutograd", fn)


_register_torch_ops()


def sde_step_torch(req: requests.SDERequest) -> ref.SDEStep:
    """sde_step through ``torch.ops.grpo_guard.sde_step_torch`` (the compiled path)."""
    sig_t, nxt_t, sig_f, nxt_f = _sigma_args(req)
    xp_out, log_prob, mean, std_dev_t, err = torch.ops.grpo_guard.sde_step_torch(
        req.model_output, req.sample, req.prev_sample, req.noise, sig_t, nxt_t, sig_f, nxt_f, req.noise_level,
        req.dynamics, req.return_mean, req.check)
    errors.record(err, req.sample.device)
    return ref.SDEStep(xp_out if req.prev_sample is None else req.prev_sample, log_prob,
                       mean if req.return_mean else None, std_dev_t)


def policy_loss_torch(req: requests.LossRequest):
    """policy_loss through ``torch.ops.grpo_guard.policy_loss_torch`` (the compiled path)."""
    sig_t, nxt_t, sig_f, nxt_f = _sigma_args(req)
    loss, stats, err = torch.ops.grpo_guard.policy_loss_torch(
        req.model_output, req.sample, req.prev_sample, req.old_log_prob, req.old_prev_sample_mean,
        req.old_model_output, req.advantages, sig_t, nxt_t, sig_f, nxt_f, req.noise_level, req.dynamics,
        req.method, req.clip_range, req.adv_clip_max, req.guard_weight, req.check, req.kl_threshold)
    errors.record(err, req.sample.device)
    has_bias = req.old_prev_sample_mean is not None or req.old_model_output is not None
    return loss, layout.stats_dict(stats, req.sample.shape[0], has_bias, req.method)


def _sigma_args(req):
    """(sig_t, nxt_t, sig_f, nxt_f): float64 (B,) tensors and zeros, or None and the floats."""
    if isinstance(req.sigma, torch.Tensor):
        return req.sigma, req.sigma_next, 0.0, 0.0
    return None, None, float(req.sigma), float(req.sigma_next)


#: the compiled path of each backend: op name -> backend -> function of the request
COMPILED = {"sde_step": {"torch": sde_step_torch}, "policy_loss": {"torch": policy_loss_torch}}
if _TRITON:
    COMPILED["sde_step"]["triton"] = sde_step_triton
    COMPILED["policy_loss"]["triton"] = policy_loss_triton


def _register_cuda_ops():
    """The CUDA extension's operators (TORCH_LIBRARY in csrc/binding.cpp), where the extension is built."""
    from . import cuda_backend
    if cuda_backend._load() is None:
        return
    cuda_backend.register_operators()
    COMPILED["sde_step"]["cuda"] = cuda_backend.sde_step_compiled
    COMPILED["policy_loss"]["cuda"] = cuda_backend.policy_loss_compiled


_register_cuda_ops()
