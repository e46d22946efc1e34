"""grpo_guard: fast, exact GRPO-Guard (RatioNorm + cross-step gradient reweighting) for flow-matching RL.

    import grpo_guard as gg
    step = gg.sde_step(v, x, sigma, sigma_next, noise_level=0.7, dynamics="flow")
    loss, stats = gg.policy_loss(v, x, x_next, sigma, sigma_next, adv, old_model_output=v_old, method="guard")
    adv = gg.group_advantages(rewards, group_ids)

The math is SPEC.md, implemented once in :mod:`grpo_guard.reference`.
"""
from .api import SDEStep, group_advantages, kl_to_reference, policy_loss, sde_step
from .dispatch import BackendUnavailable, available_backends, backend, last_backend
from .ops.errors import InvalidInputError, check_errors

__version__ = "0.2.0"
__all__ = ["sde_step", "policy_loss", "group_advantages", "kl_to_reference", "SDEStep", "backend", "last_backend",
           "available_backends", "BackendUnavailable", "check_errors", "InvalidInputError", "__version__"]
