"""The demo's base model: a pixel-space tiny SD3 pipeline for 8x8 grayscale digits.

Real diffusers components (``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler(shift=3)``,
``StableDiffusion3Pipeline.encode_prompt`` over the tiny offline text encoders of :mod:`grpo_guard.models.tiny`)
and no VAE: the "latent" is the image itself, 1 x 8 x 8 in [-1, 1] (the adapter's ``decode`` maps it to [0, 1]).
The weights of every module ship in ``assets/digits_sd3.safetensors``.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from ..models import sd3, tiny
from .data import digit_of, prompt_for  # noqa: F401 (re-exported)

SIDE = 8                      # sklearn digits are 8 x 8
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_sd3.safetensors")
MAX_SEQ = 16                  # T5 tokens (prompts are ~15 characters)


class DigitsAdapter(sd3.Adapter):
    """The SD3 adapter on a pixel-space pipeline: latent = image (1 x 8 x 8), no VAE."""

    def latent_shape(self) -> Tuple[int, ...]:
        return (self.transformer.config.in_channels, SIDE, SIDE)


def build_pipeline(seed: int = 0):
    """A randomly initialised pixel-space tiny ``StableDiffusion3Pipeline`` (deterministic from ``seed``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=SIDE, patch_size=1, in_channels=1, out_channels=1,
                                        num_layers=3, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=32,
                                        pooled_projection_dim=32, pos_embed_max_size=SIDE)
    return sd3.PIPELINE(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=tiny.clip_text_encoder(16, True, 16, seed + 2), tokenizer=tiny.clip_tokenizer(),
        text_encoder_2=tiny.clip_text_encoder(16, True, 16, seed + 3), tokenizer_2=tiny.clip_tokenizer(),
        text_encoder_3=tiny.t5_text_encoder(32, seed + 4), tokenizer_3=tiny.t5_tokenizer())


MODULES = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def state_dict(pipe) -> Dict[str, torch.Tensor]:
    """All weights of the pipeline, keys prefixed by module name (contiguous float32 copies)."""
    out = {}
    for name in MODULES:
        for k, v in getattr(pipe, name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().float().contiguous().clone()
    return out


def save_weights(pipe, path: str, metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = state_dict(pipe)
    # tied/shared tensors (e.g. T5's shared embedding) are stored once per key: clone breaks the sharing
    save_file(sd, path, metadata=metadata or {})


def load_pipeline(path: str = ASSET):
    """The pipeline with the weights of ``path`` (default: the shipped base model)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo base weights not found: {path} (re-create them with `grpo-guard demo "
                                f"pretrain`)")
    pipe = build_pipeline()
    sd = load_file(path)
    for name in MODULES:
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        getattr(pipe, name).load_state_dict(sub, strict=True)
    return pipe


def load_adapter(path: str = ASSET) -> DigitsAdapter:
    return DigitsAdapter(load_pipeline(path), resolution=SIDE, max_sequence_length=MAX_SEQ)
