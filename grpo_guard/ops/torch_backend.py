"""The ``torch`` backend: the reference implementation itself (any device, autograd by PyTorch).

Device-side input checks (validate=True) are a few elementwise torch ops here (:func:`requests.checked`): a
per-sample value that fails is replaced by NaN before the computation, so that sample's outputs are NaN, and the
error word (:mod:`.errors`) says why.
"""
from __future__ import annotations

from .. import reference as ref
from .requests import LossRequest, SDERequest, record_checked


def unsupported_reason(device):
    return None


def sde_step(req: SDERequest) -> ref.SDEStep:
    req = record_checked(req)
    return ref.sde_step(req.model_output, req.sample, req.sigma, req.sigma_next, **req.reference_kwargs())


def policy_loss(req: LossRequest):
    req = record_checked(req)
    return ref.policy_loss(req.model_output, req.sample, req.prev_sample, req.sigma, req.sigma_next,
                           req.advantages, **req.reference_kwargs())
