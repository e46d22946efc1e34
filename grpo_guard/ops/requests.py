"""Validated, normalized arguments of the public ops: what every backend receives.

All checks live here, once, so every backend rejects the same bad input with the same message. Latent-sized
tensors are checked by shape/dtype/device only (a full finiteness pass would cost a read of each latent;
a NaN there shows up as a NaN log-prob or loss). Python numbers (sigmas given as floats, noise_level, clip_range,
...) are checked on the host at once. Per-sample values in tensors (tensor sigmas, advantages, old log-probs) are
checked on the device without a host synchronization (``validate=True``, the default: :mod:`.errors`; the
backend does it, the Triton kernels inside the launch they make anyway), synchronously at each call
(``validate="sync"``, for debugging), or not at all (``validate=False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import reference as ref
from . import errors

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Sigma = Union[float, torch.Tensor]


@dataclass
class SDERequest:
    model_output: torch.Tensor
    sample: torch.Tensor
    sigma: Sigma          # Python float, or float64 tensor (B,) on the latents' device
    sigma_next: Sigma
    noise_level: float
    dynamics: str
    prev_sample: Optional[torch.Tensor]
    noise: Optional[torch.Tensor]  # given iff prev_sample is None; compute dtype
    return_mean: bool = True
    check: bool = False   # per-sample values in tensors still to be checked on the device (errors.py)

    def reference_kwargs(self):
        return dict(noise_level=self.noise_level, dynamics=self.dynamics, prev_sample=self.prev_sample,
                    noise=self.noise, return_mean=self.return_mean)


@dataclass
class LossRequest:
    model_output: torch.Tensor
    sample: torch.Tensor
    prev_sample: torch.Tensor
    sigma: Sigma
    sigma_next: Sigma
    advantages: torch.Tensor
    old_log_prob: Optional[torch.Tensor]
    old_prev_sample_mean: Optional[torch.Tensor]
    old_model_output: Optional[torch.Tensor]
    noise_level: float
    dynamics: str
    method: str
    clip_range: float
    adv_clip_max: float
    guard_weight: str
    check: bool = False   # per-sample values in tensors still to be checked on the device (errors.py)
    kl_threshold: float = 1e-5  # method "dppo"

    def reference_kwargs(self):
        return dict(old_log_prob=self.old_log_prob, old_prev_sample_mean=self.old_prev_sample_mean,
                    old_model_output=self.old_model_output, noise_level=self.noise_level,
                    dynamics=self.dynamics, method=self.method, clip_range=self.clip_range,
                    adv_clip_max=self.adv_clip_max, guard_weight=self.guard_weight, kl_threshold=self.kl_threshold)


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _positive_float(name, value, allow_inf=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}") from None
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive{'' if allow_inf else ' finite'} number, got {value}")
    return value


def _latent(name, t, like=None, allow_grad=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if like is None:
        if t.dim() < 2:
            raise ValueError(f"{name} must have a batch dim and at least one latent dim, got shape "
                             f"{tuple(t.shape)}")
        if t.shape[0] == 0 or math.prod(t.shape[1:]) == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    else:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of model_output {tuple(like.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but model_output is on {like.device}")
    if not allow_grad and t.requires_grad:
        raise ValueError(f"{name} is rollout data and must not require grad (pass {name}.detach()); "
                         "gradients flow to model_output only")
    return t


def _check_dtype_mix(named):
    """float64 computes in float64: mixing it with lower precision is a mistake, not a promotion."""
    f64 = [n for n, t in named if t is not None and t.dtype == torch.float64]
    other = [n for n, t in named if t is not None and t.dtype != torch.float64]
    if f64 and other:
        raise TypeError(f"dtype mix: {', '.join(f64)} float64 but {', '.join(other)} not; "
                        "use float64 for all latent inputs or for none")


def validate_mode(validate) -> str:
    """validate=True -> "device" (values in tensors checked on the device, no sync), "sync", False -> "off"."""
    if validate is True:
        return "device"
    if validate is False:
        return "off"
    if validate == "sync":
        return "sync"
    raise ValueError(f"validate must be True, False or 'sync', got {validate!r}")


def _per_sample_vector(name, t, B, device, mode, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({B},), got {type(t).__name__}")
    if t.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one value per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the latents are on {device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if mode == "sync" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values: {t.detach().cpu().tolist()}")
    return t if dtype is None else t.to(dtype)


def _refuse_float_sigmas_in_capture(device):
    """A Python-float sigma becomes a kernel argument: a CUDA graph would replay it at every later timestep."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("sigma and sigma_next are Python floats while a CUDA graph is being captured: the graph "
                         "would replay this step's values at every later timestep. Pass them as float64 tensors on "
                         "the latents' device and write each timestep's values into those tensors before replaying")


def _sigmas(sigma, sigma_next, B, device, mode):
    """-> (sigma, sigma_next): both floats, or both float64 tensors (B,) on ``device`` (a 0-dim or length-1 tensor
    is expanded, a view). Float values are checked on the host; tensor values by ``mode``. Under torch.compile
    floats become tensors (checked on the device): a float compared on the host would be a guarded constant, and
    every timestep would compile again."""
    def norm(name, s):
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            if torch.compiler.is_compiling():  # a graph input, not a guarded constant: one graph for all timesteps
                # (zeros + s: inductor turns the float into a float64 tensor input; torch.full would specialize it)
                return torch.zeros(B, dtype=torch.float64, device=device) + s
            return float(s)
        if isinstance(s, torch.Tensor):
            if s.requires_grad:
                raise ValueError(f"{name} must not require grad")
            if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, B)):
                raise ValueError(f"{name} must be a float or a tensor of shape (), (1,) or ({B},), got shape "
                                 f"{tuple(s.shape)}")
            if not s.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {s.dtype}")
            s = s.to(device=device, dtype=torch.float64)
            return s if s.shape == (B,) and s.is_contiguous() else s.reshape(-1).expand(B).contiguous()
        raise TypeError(f"{name} must be a float or a 1-D tensor, got {type(s).__name__}")

    sig, nxt = norm("sigma", sigma), norm("sigma_next", sigma_next)
    if isinstance(sig, torch.Tensor) != isinstance(nxt, torch.Tensor):
        sig = sig if isinstance(sig, torch.Tensor) else torch.full((B,), sig, dtype=torch.float64, device=device)
        nxt = nxt if isinstance(nxt, torch.Tensor) else torch.full((B,), nxt, dtype=torch.float64, device=device)
    if not isinstance(sig, torch.Tensor) and not torch.compiler.is_compiling():
        _refuse_float_sigmas_in_capture(torch.device(device))
    if not isinstance(sig, torch.Tensor):
        _check_sigma_values([sig], [nxt])
    elif mode == "sync":
        _check_sigma_values(sig.detach().cpu().tolist(), nxt.detach().cpu().tolist())
    return sig, nxt


def _check_sigma_values(s_vals, n_vals):
    """SPEC §2: 0 < sigma <= 1, 0 <= sigma_next < sigma (lists of floats; NaN fails every comparison)."""
    if not all(0 < s <= 1 for s in s_vals):
        raise ValueError(f"sigma must lie in (0, 1], got {s_vals}")
    if not all(0 <= n < math.inf for n in n_vals):
        raise ValueError(f"sigma_next must be finite and >= 0, got {n_vals}")
    if not all(n < s for s, n in zip(s_vals, n_vals)):
        raise ValueError(f"sigma_next must be < sigma (dt = sigma_next - sigma < 0), got sigma={s_vals}, "
                         f"sigma_next={n_vals}")


def _common(model_output, sample, sigma, sigma_next, noise_level, dynamics, mode):
    _latent("model_output", model_output)
    _latent("sample", sample, like=model_output)
    _choice("dynamics", dynamics, ref.DYNAMICS)
    eta = _positive_float("noise_level", noise_level)
    if dynamics == "cps" and eta > 1:
        raise ValueError(f"noise_level must be in (0, 1] for cps dynamics (s = sigma'*sin(eta*pi/2)), got {eta}")
    B = model_output.shape[0]
    sig, nxt = _sigmas(sigma, sigma_next, B, model_output.device, mode)
    return B, eta, sig, nxt


def _draw_noise(sample, dtype, generator):
    """Standard normal noise like ``sample`` in ``dtype``; a generator on another device draws there."""
    if generator is not None and generator.device != sample.device:
        z = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=dtype)
        return z.to(sample.device)
    return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=dtype)


def sde_request(model_output, sample, sigma, sigma_next, *, noise_level, dynamics, prev_sample, generator,
                noise, validate, return_mean=True) -> SDERequest:
    mode = validate_mode(validate)
    B, eta, sig, nxt = _common(model_output, sample, sigma, sigma_next, noise_level, dynamics, mode)
    if prev_sample is not None:
        _latent("prev_sample", prev_sample, like=model_output)
        if noise is not None or generator is not None:
            raise ValueError("noise/generator draw a new prev_sample; give them only when prev_sample is None")
    _check_dtype_mix([("model_output", model_output), ("sample", sample), ("prev_sample", prev_sample),
                      ("noise", noise)])
    cd = ref.compute_dtype(model_output, sample, prev_sample)
    if prev_sample is None:
        if noise is None:
            noise = _draw_noise(sample, cd, generator)
        else:
            _latent("noise", noise, like=model_output, allow_grad=False)
            noise = noise.to(cd)
    if not isinstance(return_mean, bool):
        raise TypeError(f"return_mean must be a bool, got {type(return_mean).__name__}")
    return SDERequest(model_output, sample, sig, nxt, eta, dynamics, prev_sample, noise, return_mean,
                      check=mode == "device" and isinstance(sig, torch.Tensor))


# methods whose loss divides by the transition std s (0 for cps at sigma_next == 0): RatioNorm's S1/s, dppo's KL
DIVIDES_BY_STD = ("ratio_norm", "guard", "dppo")


def loss_request(model_output, sample, prev_sample, sigma, sigma_next, advantages, *, old_log_prob,
                 old_prev_sample_mean, old_model_output, noise_level, dynamics, method, clip_range,
                 adv_clip_max, guard_weight, validate, kl_threshold=1e-5) -> LossRequest:
    mode = validate_mode(validate)
    B, eta, sig, nxt = _common(model_output, sample, sigma, sigma_next, noise_level, dynamics, mode)
    _choice("method", method, ref.METHODS)
    _choice("guard_weight", guard_weight, ref.GUARD_WEIGHTS)
    if sample.requires_grad:
        raise ValueError("sample is rollout data and must not require grad (pass sample.detach()); "
                         "policy_loss differentiates w.r.t. model_output only")
    _latent("prev_sample", prev_sample, like=model_output, allow_grad=False)
    if old_prev_sample_mean is not None:
        _latent("old_prev_sample_mean", old_prev_sample_mean, like=model_output, allow_grad=False)
    if old_model_output is not None:
        _latent("old_model_output", old_model_output, like=model_output, allow_grad=False)
    if old_prev_sample_mean is not None and old_model_output is not None:
        raise ValueError("give old_prev_sample_mean or old_model_output, not both (they define the same "
                         "old mean; old_model_output is exact and cheaper)")
    has_old_mean = old_prev_sample_mean is not None or old_model_output is not None
    if method == "grpo":
        if old_log_prob is None and not has_old_mean:
            raise ValueError("method='grpo' needs old_log_prob (or old_model_output / old_prev_sample_mean "
                             "for the exact closed form)")
    elif not has_old_mean:
        raise ValueError(f"method={method!r} needs old_prev_sample_mean (what sde_step returned at rollout) "
                         "or old_model_output (the rollout velocity)"
                         + ("; old_log_prob alone does not give the KL" if method == "dppo" else ""))
    _check_dtype_mix([("model_output", model_output), ("sample", sample), ("prev_sample", prev_sample),
                      ("old_prev_sample_mean", old_prev_sample_mean), ("old_model_output", old_model_output)])
    device = model_output.device
    advantages = _per_sample_vector("advantages", advantages, B, device, mode)
    if advantages.requires_grad:
        raise ValueError("advantages must not require grad")
    if old_log_prob is not None:
        old_log_prob = _per_sample_vector("old_log_prob", old_log_prob, B, device, mode)
        if old_log_prob.requires_grad:
            raise ValueError("old_log_prob is rollout data and must not require grad")
    eps = _positive_float("clip_range", clip_range)
    if eps >= 1:
        raise ValueError(f"clip_range must be < 1, got {eps}")
    adv_max = _positive_float("adv_clip_max", adv_clip_max, allow_inf=True)
    tau = _positive_float("kl_threshold", kl_threshold)
    if dynamics == "cps" and method in DIVIDES_BY_STD:
        nvals = [nxt] if not isinstance(nxt, torch.Tensor) else nxt.detach().cpu().tolist() if mode == "sync" else []
        if any(n == 0 for n in nvals):
            raise ValueError("method=%r divides by the transition std, which is 0 for cps at sigma_next == 0; "
                             "do not train the last step" % method)
    return LossRequest(model_output, sample, prev_sample, sig, nxt, advantages, old_log_prob,
                       old_prev_sample_mean, old_model_output, eta, dynamics, method, eps, adv_max, guard_weight,
                       check=mode == "device", kl_threshold=tau)


def per_sample_oks(req, values):
    """The rules for ``req``'s per-sample values (SPEC §2; errors.CHECKS), one entry per error bit from the op's
    offset, True where a sample passes (None: not checked). ``values`` maps the argument names to the values: the
    tensors (device checks) or numpy views of them (errors.host_values): the same comparisons for both. What is
    checked is what ``values`` holds (:func:`_checked_values`)."""
    oks = [None, None, None]
    if "sigma" in values:
        sig, nxt = values["sigma"], values["sigma_next"]
        oks[0] = (sig > 0) & (sig <= 1)
        oks[1] = (nxt >= 0) & (nxt < sig)  # NaN and +inf fail
        if isinstance(req, LossRequest) and req.dynamics == "cps" and req.method in DIVIDES_BY_STD:
            oks[2] = nxt != 0
    if isinstance(req, SDERequest):
        return oks[:2]
    for name in ("advantages", "old_log_prob"):
        oks.append(errors.finite(values[name]) if name in values else None)
    return oks


def _checked_values(req):
    """The per-sample values ``req`` checks, by argument name: tensor sigmas, advantages, old log-probs."""
    names = ("sigma", "sigma_next") if isinstance(req.sigma, torch.Tensor) else ()
    if isinstance(req, LossRequest):
        names += tuple(n for n in ("advantages", "old_log_prob") if getattr(req, n) is not None)
    return {n: getattr(req, n) for n in names}


def checked(req):
    """The device-side checks of ``req`` (validate=True) with torch ops, for the backends whose kernels do not make
    them (torch, cuda): -> (req', code). ``req'`` has NaN in place of every per-sample value that failed (sigmas,
    advantages, old log-probs), so the computation itself makes that sample's outputs NaN; ``code`` is the
    error-word bits (:func:`errors.failed`, an integer tensor of shape ()) or None when nothing is checked (or, for
    CPU tensors read on the host, nothing failed). No host synchronization, nothing recorded
    (:func:`record_checked` records)."""
    if not req.check:
        return req, None
    values = _checked_values(req)
    if errors.passes_on_host(values, lambda host: per_sample_oks(req, host)):
        return req, None
    oks = per_sample_oks(req, values)
    changes = {}
    if oks[0] is not None:  # tensor sigmas: NaN where a sigma rule fails (every output of that sample is NaN)
        ok = oks[0] & oks[1]
        if len(oks) > 2 and oks[2] is not None:
            ok = ok & oks[2]
        changes["sigma"] = torch.where(ok, req.sigma, math.nan)
    if isinstance(req, SDERequest):
        return _replace(req, changes), errors.failed(errors.SDE_STEP, oks)
    for name, ok in zip(("advantages", "old_log_prob"), oks[3:]):
        if ok is not None:  # inf -> NaN: the advantage clamp would keep inf finite
            changes[name] = torch.where(ok, getattr(req, name), math.nan)
    return _replace(req, changes), errors.failed(errors.POLICY_LOSS, oks)


def _replace(req, changes):
    """A copy of the request with ``changes`` (dataclasses.replace without re-running __init__)."""
    if not changes:
        return req
    out = object.__new__(type(req))
    out.__dict__.update(req.__dict__, **changes)
    return out


def record_checked(req):
    """:func:`checked`, recording the bits in the error word; returns ``req'``."""
    req, code = checked(req)
    if code is not None:
        errors.record(code, req.model_output.device)
    return req
