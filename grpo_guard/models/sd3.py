"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): three text encoders, classifier-free guidance by
a doubled batch [uncond, cond], latents (B, C, H, W), ``FlowMatchEulerDiscreteScheduler(shift=3)`` sigmas."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from . import tiny
from .base import Cond, FlowAdapter

try:
    from diffusers import StableDiffusion3Pipeline as PIPELINE
except ImportError:  # pragma: no cover - the train extra is missing
    PIPELINE = None

# T5 tokens of a prompt: flow_grpo's SD3 scripts encode at 128 (the pipeline's default is 256); SD3 attends to the
# padding, so the length changes the conditioning
MAX_SEQUENCE_LENGTH = 128

# flow_grpo's LoRA targets for SD3.5 (attention projections of both streams)
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


class SD3Cond(Cond):
    """prompt_embeds (B, L, C), pooled (B, P) and their negative (unconditional) counterparts."""


class Adapter(FlowAdapter):
    family = "sd3"
    default_max_sequence_length = MAX_SEQUENCE_LENGTH
    input_projection = "pos_embed.proj"

    def _encode(self, prompts: Sequence[str]):
        with torch.no_grad():
            pe, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return pe, pooled

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "") -> SD3Cond:
        """The negative prompt is encoded once per adapter and expanded (a view): stored rollouts hold only the
        per-sample positive embeddings."""
        cache = self.__dict__.setdefault("_negative", {})
        if negative_prompt not in cache:
            cache[negative_prompt] = self._encode([negative_prompt])
        ne, npool = cache[negative_prompt]
        pe, pooled = self._encode(prompts)
        B = len(prompts)
        return SD3Cond(prompt_embeds=pe, pooled=pooled, neg_prompt_embeds=ne.expand(B, *ne.shape[1:]),
                       neg_pooled=npool.expand(B, *npool.shape[1:]))

    def latent_shape(self) -> Tuple[int, ...]:
        side = self.resolution // self.latent_scale
        return (self.transformer.config.in_channels, side, side)

    def sigmas(self, num_steps: int) -> List[float]:
        sched = self._scheduler()
        sched.set_timesteps(num_steps, device="cpu")
        return [float(s) for s in sched.sigmas]

    def velocity(self, model, latents, sigma, cond, guidance_scale, cfg=True):
        B = latents.shape[0]
        latents = self.model_input(latents)
        guided = cfg and guidance_scale > 1.0
        if guided:
            hidden = torch.cat([latents, latents])
            enc = torch.cat([cond["neg_prompt_embeds"], cond["prompt_embeds"]])
            pooled = torch.cat([cond["neg_pooled"], cond["pooled"]])
        else:
            hidden, enc, pooled = latents, cond["prompt_embeds"], cond["pooled"]
        # float32 like StableDiffusion3Pipeline's scheduler timesteps (bf16 would round 1000*sigma by up to 2)
        t = torch.full((hidden.shape[0],), sigma * 1000.0, device=latents.device, dtype=torch.float32)
        out = model(hidden_states=hidden, timestep=t, encoder_hidden_states=enc, pooled_projections=pooled,
                    return_dict=False)[0]
        out = out if self.velocity_dtype is None else out.to(self.velocity_dtype)
        if not guided:
            return out
        uncond, text = out[:B], out[B:]
        return uncond + guidance_scale * (text - uncond)


def tiny_transformer(seed: int = 0, sample_size: int = 8, in_channels: int = 4):
    """A random 2-layer ``SD3Transformer2DModel`` matching the tiny text encoders (joint dim 32, pooled 32)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=in_channels,
                                 out_channels=in_channels, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                 pos_embed_max_size=32)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None, with_vae: bool = True):
    """A random tiny ``StableDiffusion3Pipeline`` built in memory: latents 4 x 8 x 8 at 16 px.

    ``transformer``: use this one instead of :func:`tiny_transformer` (e.g. a pretrained toy model; its
    ``joint_attention_dim`` must be 32 and ``pooled_projection_dim`` 32). ``with_vae=False``: a pixel-space
    pipeline (latents are images; see :meth:`FlowAdapter.decode`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = transformer if transformer is not None else tiny_transformer(seed)
    pipe = PIPELINE(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny.vae(4, seed + 1) if with_vae else None,
        text_encoder=tiny.clip_text_encoder(16, True, 16, seed + 2), tokenizer=tiny.clip_tokenizer(),
        text_encoder_2=tiny.clip_text_encoder(16, True, 16, seed + 3), tokenizer_2=tiny.clip_tokenizer(),
        text_encoder_3=tiny.t5_text_encoder(32, seed + 4), tokenizer_3=tiny.t5_tokenizer())
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
