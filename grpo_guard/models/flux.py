"""Flux.1 (``FluxPipeline``): CLIP pooled + T5 embeddings, the guidance *embedding* (no CFG batch), packed
latents (B, (H/2)(W/2), 4C) with image/text position ids, and the dynamic shift ``mu`` from the sequence length."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from . import tiny
from .base import Cond, FlowAdapter

try:
    from diffusers import FluxPipeline as PIPELINE
except ImportError:  # pragma: no cover - the train extra is missing
    PIPELINE = None

MAX_SEQUENCE_LENGTH = 512  # T5 tokens of a prompt (FluxPipeline's default)

LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]


class FluxCond(Cond):
    """prompt_embeds (B, L, C), pooled (B, P); txt_ids (L, 3) is shared by the batch."""

    shared = ("txt_ids",)


class Adapter(FlowAdapter):
    family = "flux"
    default_max_sequence_length = MAX_SEQUENCE_LENGTH
    input_projection = "x_embedder"

    def _latent_side(self) -> int:
        return 2 * (self.resolution // (self.latent_scale * 2))

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "") -> FluxCond:
        with torch.no_grad():
            pe, pooled, txt_ids = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                          max_sequence_length=self.max_sequence_length)
        return FluxCond(prompt_embeds=pe, pooled=pooled, txt_ids=txt_ids)

    def latent_shape(self) -> Tuple[int, ...]:
        side = self._latent_side()
        return ((side // 2) * (side // 2), self.transformer.config.in_channels)

    def mu(self) -> float:
        """Dynamic shift for this resolution's image sequence length (the pipeline's ``calculate_shift``)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        return float(calculate_shift(self.latent_shape()[0], c.get("base_image_seq_len", 256),
                                     c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                     c.get("max_shift", 1.15)))

    def sigmas(self, num_steps: int) -> List[float]:
        sched = self._scheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=self.mu(), device="cpu")
        return [float(s) for s in sched.sigmas]

    def velocity(self, model, latents, sigma, cond, guidance_scale, cfg=True):
        B = latents.shape[0]
        side = self._latent_side()
        img_ids = self.pipe._prepare_latent_image_ids(B, side // 2, side // 2, latents.device, latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((B,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        t = torch.full((B,), sigma, device=latents.device, dtype=latents.dtype)
        out = model(hidden_states=self.model_input(latents), timestep=t, guidance=guidance,
                    pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
                    txt_ids=cond["txt_ids"], img_ids=img_ids, return_dict=False)[0]
        return out if self.velocity_dtype is None else out.to(self.velocity_dtype)

    def unpack(self, latents):
        return self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.latent_scale)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None, with_vae: bool = True):
    """A random tiny ``FluxPipeline`` built in memory: 1+1-layer transformer with guidance embedding;
    at 16 px the packed latent is 16 tokens x 16. ``transformer`` / ``with_vae`` as in :func:`.sd3.tiny_pipeline`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if transformer is None:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = PIPELINE(transformer=transformer, scheduler=scheduler, vae=tiny.vae(4, seed + 1) if with_vae else None,
                    text_encoder=tiny.clip_text_encoder(32, False, seed=seed + 2), tokenizer=tiny.clip_tokenizer(),
                    text_encoder_2=tiny.t5_text_encoder(32, seed + 3), tokenizer_2=tiny.t5_tokenizer())
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
