"""Tiny tokenizers and text encoders built in memory (no download) for the tiny offline pipelines.

The tokenizers are the real CLIPTokenizer / T5TokenizerFast classes over a character-level vocabulary, so the
pipelines' own ``encode_prompt`` runs unchanged.
"""
from __future__ import annotations

import string

import torch

CHARS = string.ascii_lowercase + string.digits
MAX_CLIP_TOKENS = 16


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_CLIP_TOKENS)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in CHARS] + [(c, -2.0) for c in CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=64)


def clip_text_encoder(hidden: int, with_projection: bool, projection_dim: int = 0, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_CLIP_TOKENS,
                         projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def t5_text_encoder(d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=3 + 2 * len(CHARS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg)


def umt5_text_encoder(d_model: int, seed: int = 0):
    """A random 1-layer ``UMT5EncoderModel`` (Wan's text encoder class) over the character vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=3 + 2 * len(CHARS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                     num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return UMT5EncoderModel(cfg)


def wan_vae(latent_channels: int = 4, seed: int = 0):
    """A random ``AutoencoderKLWan`` of width 3 with Wan 2.1's downsampling (spatial factor 8, temporal 4) and
    made-up latent statistics (so the un-normalization in decode is exercised)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(latent_channels, generator=g) * 0.3).tolist()
    std = (torch.rand(latent_channels, generator=g) + 0.5).tolist()
    return AutoencoderKLWan(base_dim=3, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)


def vae(latent_channels: int = 4, seed: int = 0):
    """An AutoencoderKL with 2 blocks: images of side 2*h for latents of side h."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False, use_post_quant_conv=False)


def clip_model(seed: int = 0, image_size: int = 32):
    """A random tiny ``CLIPModel`` (1 text + 1 vision layer, width 16) and its ``CLIPProcessor`` (the character
    tokenizer above, a ``CLIPImageProcessor`` at ``image_size``): a stand-in for the CLIP score / PickScore
    reward weights. ``model.save_pretrained(d); processor.save_pretrained(d)`` makes a local reward path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(vocab_size=2 + 2 * len(CHARS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=MAX_CLIP_TOKENS, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=image_size // 4)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())
