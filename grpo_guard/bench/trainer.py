"""Time trainer steps (rollout + update) of an SD3.5-M-sized or Wan 2.1 1.3B-sized transformer, random init from
its config (no download), with the fused ops (backend "auto") vs the reference ops (backend "torch").

    python -m grpo_guard.bench.trainer                    # NVIDIA GPU: SD3.5-M transformer, bf16, 512 px latents
    python -m grpo_guard.bench.trainer --model wan --frames 33   # Wan 2.1 T2V 1.3B, 480 x 832, 33 frames
    python -m grpo_guard.bench.trainer --tiny --steps 1   # CPU smoke run (tiny transformer; also --model wan)

(``grpo-guard bench trainer ...``, and from a checkout ``python benchmarks/bench_trainer.py ...``, the same; needs
the ``train`` extra: diffusers.)

Text encoders and VAE are left out (random prompt embeddings of the real shapes: SD3 333 tokens, Wan 512 UMT5
tokens; a reward on the latents, so nothing is decoded): what is timed is the transformer, our ops and the trainer
around them. Reports samples (images / videos) per second, peak GPU memory and the share of step time spent in
sde_step / policy_loss *forward* calls (measured with a device synchronization around each call in a separate
pass; their backward runs inside the transformer's backward and is not split out).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import grpo_guard as gg
from grpo_guard.models import sd3, wan
from grpo_guard.models.base import to_dtype
from grpo_guard.trainer import Reward, Trainer, from_dict
from grpo_guard.trainer.rewards import declare

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
TINY = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32)


class RandomPromptAdapter(sd3.Adapter):
    """SD3 adapter whose prompt embeddings are random tensors of the real shapes (333 tokens = 77 CLIP + 256 T5)."""

    def encode_prompts(self, prompts, negative_prompt=""):
        c = self.transformer.config
        g = torch.Generator().manual_seed(len(prompts))
        dt = next(self.transformer.parameters()).dtype

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(self.device, dt)
        B, L = len(prompts), (333 if c.joint_attention_dim == 4096 else 16)
        return sd3.SD3Cond(prompt_embeds=rnd(B, L, c.joint_attention_dim), pooled=rnd(B, c.pooled_projection_dim),
                           neg_prompt_embeds=rnd(B, L, c.joint_attention_dim),
                           neg_pooled=rnd(B, c.pooled_projection_dim))


# Wan2.1-T2V-1.3B's transformer config
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=32,
                freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


class RandomPromptWanAdapter(wan.Adapter):
    """Wan adapter whose prompt embeddings are random tensors of the real shape (512 UMT5 tokens x 4096)."""

    def _encode(self, prompts):
        c = self.transformer.config
        g = torch.Generator().manual_seed(len(prompts))
        L = self.max_sequence_length
        return torch.randn(len(prompts), L, c.text_dim, generator=g).to(self.device, self.transformer.dtype)


def _transformer(cls, kwargs, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device itself (billions of parameters on a CPU take minutes)
        transformer = cls(**kwargs)
    # in dtype as from_pretrained(torch_dtype=dtype) loads it (Wan keeps its norms and embedders in float32)
    return to_dtype(transformer, getattr(torch, dtype))


def build(args, out_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = "float32" if device == "cpu" else "bfloat16"
    model = {"family": args.model, "tiny": True, "dtype": dtype}
    if args.model == "wan":
        transformer = _transformer(WanTransformer3DModel, WAN_TINY if args.tiny else WAN_1_3B, device, dtype)
        pipe = wan.PIPELINE(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        height, width, frames = (32, 32, 9) if args.tiny else (args.height, args.width, args.frames)
        model.update(height=height, width=width, num_frames=frames, max_sequence_length=16 if args.tiny else 512)
        adapter = RandomPromptWanAdapter(pipe, height=height, width=width, num_frames=frames,
                                         max_sequence_length=model["max_sequence_length"])
    else:
        transformer = _transformer(SD3Transformer2DModel, TINY if args.tiny else SD35M, device, dtype)
        pipe = sd3.PIPELINE(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            text_encoder_3=None, tokenizer_3=None)
        side = 8 if args.tiny else 64  # 512 px / VAE factor 8
        model["resolution"] = side
        adapter = RandomPromptAdapter(pipe, resolution=side)
    per_step = args.batch_size * args.num_batches
    cfg = from_dict({
        "model": model,
        "sample": {"num_steps": 10, "group_size": max(2, per_step // 2), "batch_size": args.batch_size,
                   "num_batches": args.num_batches},
        "train": {"updates_per_step": 1, "method": "guard", "gradient_checkpointing": args.gradient_checkpointing},
        "rewards": {"proxy": [{"name": "latent_mean"}]}, "data": {"prompts": [f"p{i}" for i in range(16)]},
        "run": {"output_dir": out_dir, "mixed_precision": "no" if device == "cpu" else "bf16", "progress": False,
                "tensorboard": False, "cpu": device == "cpu"}})
    # a reward on the final latents: nothing is decoded
    reward = declare(lambda x, p, m: x.float().flatten(1).mean(1), input="latents")
    return Trainer(cfg, adapter=adapter, proxy_rewards=[Reward("latent_mean", reward)], gold_rewards=[]), device


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ops(device, acc):
    """Wrap gg.sde_step / gg.policy_loss with synchronizing timers (accumulating into ``acc``)."""
    real = {n: getattr(gg, n) for n in ("sde_step", "policy_loss")}

    def wrap(name):
        def f(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            out = real[name](*a, **k)
            sync(device)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
            return out
        return f
    for n in real:
        setattr(gg, n, wrap(n))
    return lambda: [setattr(gg, n, f) for n, f in real.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model", choices=("sd3", "wan"), default="sd3")
    p.add_argument("--frames", type=int, default=33, help="wan: frames per video (4k + 1)")
    p.add_argument("--height", type=int, default=480, help="wan: frame height")
    p.add_argument("--width", type=int, default=832, help="wan: frame width")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--backends", default="torch,auto")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    rows = []
    for name in args.backends.split(","):
        with tempfile.TemporaryDirectory() as d, gg.backend(name):
            trainer, device = build(args, d)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer.step()  # warm-up (kernel compilation, allocator)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            sync(device)
            step_s = (time.perf_counter() - t0) / args.steps
            acc = {}
            restore = timed_ops(device, acc)
            try:
                trainer.step()
            finally:
                restore()
            samples = args.batch_size * args.num_batches
            gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            shape = list(trainer.adapter.latent_shape())
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
            rows.append(dict(model=args.model, latent_shape=shape, backend=name, ran=gg.last_backend(), device=gpu,
                             step_s=step_s, samples_per_s=samples / step_s, peak_gib=peak,
                             gradient_checkpointing=args.gradient_checkpointing,
                             ops_fwd_s=sum(acc.values()), ops_share=sum(acc.values()) / step_s, **acc))
            print(json.dumps(rows[-1]))
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
