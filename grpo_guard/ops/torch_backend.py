"""The ``torch`` backend: the reference implementation itself (any device, autograd by PyTorch)."""
from __future__ import annotations

from .. import reference as ref
from .requests import LossRequest, SDERequest


def unsupported_reason(device):
    return None


def sde_step(req: SDERequest) -> ref.SDEStep:
    return ref.sde_step(req.model_output, req.sample, req.sigma, req.sigma_next, **req.reference_kwargs())


def policy_loss(req: LossRequest):
    return ref.policy_loss(req.model_output, req.sample, req.prev_sample, req.sigma, req.sigma_next,
                           req.advantages, **req.reference_kwargs())
