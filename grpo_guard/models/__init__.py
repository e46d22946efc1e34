"""One small adapter per model family: how to encode prompts, call the transformer (CFG for SD3 and Wan, the
guidance embedding for Flux), lay out latents, get the scheduler's sigmas and decode images (or video frames).
Everything family-specific lives in :mod:`.sd3`, :mod:`.flux` and :mod:`.wan`; the trainer only talks to
:class:`FlowAdapter`.
"""
from __future__ import annotations

from .base import Cond, FlowAdapter, build_adapter

__all__ = ["Cond", "FlowAdapter", "build_adapter"]
