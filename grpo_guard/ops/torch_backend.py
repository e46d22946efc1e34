"""The ``torch`` backend: the reference implementation itself (any device, autograd by PyTorch).

Device-side input checks (validate=True) are a few elementwise torch ops here (:func:`requests.device_checks`):
the samples that fail get NaN outputs and the error word (:mod:`.errors`) says why.
"""
from __future__ import annotations

from .. import reference as ref
from . import errors
from .requests import LossRequest, SDERequest, device_checks


def unsupported_reason(device):
    return None


def sde_step(req: SDERequest) -> ref.SDEStep:
    out = ref.sde_step(req.model_output, req.sample, req.sigma, req.sigma_next, **req.reference_kwargs())
    return poisoned_sde_step(out, device_checks(req))


def policy_loss(req: LossRequest):
    loss, stats = ref.policy_loss(req.model_output, req.sample, req.prev_sample, req.sigma, req.sigma_next,
                                  req.advantages, **req.reference_kwargs())
    return poisoned_loss(loss, stats, device_checks(req))


def poisoned_sde_step(out: ref.SDEStep, bad) -> ref.SDEStep:
    """NaN log-probs for the samples that failed a device-side check (``bad`` (B,) bool, or None)."""
    return out if bad is None else out._replace(log_prob=errors.poison(out.log_prob, bad))


def poisoned_loss(loss, stats, bad):
    """A NaN loss (and gradient) if any sample failed a device-side check, NaN per-sample log-ratios there."""
    if bad is None:
        return loss, stats
    stats = dict(stats, log_ratio=errors.poison(stats["log_ratio"], bad))
    return errors.poison(loss, bad.any()), stats
