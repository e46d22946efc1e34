"""``grpo-guard demo pretrain``: re-create the shipped base weights, deterministically from a seed.

Rectified-flow training (SPEC §1: ``x_s = (1 - s) x0 + s eps``, target velocity ``eps - x0``, timestep
``1000 s``, ``s`` logit-normal as in SD3) of the pixel-space tiny SD3 transformer on all 1,797 digits,
conditioned on "a handwritten <digit>" with 10 % of prompts dropped to "" (for classifier-free guidance).
The text encoders stay at their seeded random initialisation (frozen, as in SD3). One intra-op thread, a
seeded generator for every draw: the same seed, budget and torch build give bit-identical weights.
"""
from __future__ import annotations

import math
import time

import torch

from . import data, model as dm

DEFAULT_ITERS = 3000


def _cond_table(adapter):
    """Prompt embeddings of the ten digits (rows 0-9) and of the empty prompt (row 10)."""
    c = adapter.encode_prompts([dm.prompt_for(d) for d in range(10)])
    pe = torch.cat([c["prompt_embeds"], c["neg_prompt_embeds"][:1]])
    pooled = torch.cat([c["pooled"], c["neg_pooled"][:1]])
    return pe, pooled


def pretrain(seed: int = 0, iters: int = DEFAULT_ITERS, batch_size: int = 128, lr: float = 2e-3,
             drop_prob: float = 0.1, progress: bool = True):
    """Train the base model from scratch; returns the pipeline (see :func:`grpo_guard.demo.model.save_weights`)."""
    torch.set_num_threads(1)
    pipe = dm.build_pipeline(seed)
    adapter = dm.DigitsAdapter(pipe, resolution=dm.SIDE, max_sequence_length=dm.MAX_SEQ)
    pe_table, pooled_table = _cond_table(adapter)
    images, labels = data.digits()
    x_all, y_all = data.as_latents(images), torch.from_numpy(labels)
    tr = pipe.transformer
    tr.train().requires_grad_(True)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=iters, desc="pretrain", dynamic_ncols=True)
    ema_loss = None
    for _ in range(iters):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x0 = x_all[idx]
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(batch_size, generator=gen))
        rows = torch.where(torch.rand(batch_size, generator=gen) < drop_prob, 10, y_all[idx])
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        v = tr(hidden_states=xs, timestep=1000 * s, encoder_hidden_states=pe_table[rows],
               pooled_projections=pooled_table[rows], return_dict=False)[0]
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if bar is not None:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    tr.eval().requires_grad_(False)
    return pipe, ema_loss


def run(out: str = dm.ASSET, seed: int = 0, iters: int = DEFAULT_ITERS, progress: bool = True) -> str:
    """Pretrain and write the safetensors file (metadata: seed, iterations, final loss, torch version)."""
    t0 = time.perf_counter()
    pipe, loss = pretrain(seed=seed, iters=iters, progress=progress)
    meta = {"seed": str(seed), "iters": str(iters), "final_loss_ema": f"{loss:.5f}",
            "torch": torch.__version__, "wall_s": f"{time.perf_counter() - t0:.1f}"}
    dm.save_weights(pipe, out, meta)
    print(f"wrote {out} (seed {seed}, {iters} iterations, loss {loss:.4f}, {time.perf_counter() - t0:.0f} s)")
    return out
