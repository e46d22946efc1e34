"""The ops: validated requests, and one module per backend (torch_backend, triton_backend, cuda_backend).

Each backend module provides ``unsupported_reason(device) -> str | None``, ``sde_step(SDERequest) -> SDEStep``
and ``policy_loss(LossRequest) -> (loss, stats)`` with the contract of :mod:`grpo_guard.reference`.
"""
