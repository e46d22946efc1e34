"""Run the miniature: the base model's evaluation, then one trainer run per method with identical settings.

Every method gets the same base weights, seed, prompts, LoRA initialisation, rollout noise and
hyper-parameters; only ``train.method`` differs. Every ``eval_every`` steps a fixed evaluation set (each digit
``eval_per_digit`` times, the same initial and SDE noise at every evaluation and for every method) is sampled
and scored, which gives the REPORT table and the sample grids; the trainer itself logs the training rollouts'
proxy and gold rewards, ratios and per-timestep gradient norms to ``<out>/<method>/metrics.jsonl`` and
TensorBoard.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..trainer import config as tconfig
from ..trainer.loop import Trainer
from ..trainer.rollout import sample_batch
from . import data, model as dm, rewards as drw

EVAL_STEP = 10 ** 9  # rollout "step" whose seeds the evaluation noise uses (never a training step)


@dataclass
class Settings:
    """The miniature's setting. Shared by every method; only ``method`` differs between runs."""

    steps: int = 60
    seed: int = 0                 # the RL seed: LoRA initialisation, prompts, rollout noise
    reward_seed: int = 0          # fits the proxy and gold models and draws the evaluation set's noise: fixed
                                  # across RL seeds, so that seeds vary only the RL noise
    methods: List[str] = field(default_factory=lambda: ["grpo", "guard"])
    eval_every: int = 10
    eval_per_digit: int = 8
    # rollout / update (passed to the trainer config). Chosen once, for both methods, so that the baseline
    # visibly over-optimizes within the default budget: 32 images (4 prompts x 8) per step, 4 optimizer
    # steps per rollout (3 of them off-policy), Flow-GRPO's published clip range 1e-4.
    num_denoise: int = 10
    guidance_scale: float = 2.0   # the base model's samples are closest to the real digits at 2.0
    noise_level: float = 0.7
    group_size: int = 8
    batch_size: int = 8
    num_batches: int = 4
    updates_per_step: int = 4
    clip_range: float = 1e-4
    learning_rate: float = 2e-3
    lora_rank: int = 8
    kl_threshold: float = 1e-5    # method dppo only (Flow-DPPO's published default)
    weights: str = dm.ASSET


def trainer_config(s: Settings, method: str, out_dir: str, progress: bool = True) -> tconfig.Config:
    return tconfig.from_dict({
        "model": {"family": "sd3", "pretrained": s.weights, "dtype": "float32", "resolution": dm.SIDE,
                  "max_sequence_length": dm.MAX_SEQ, "lora": {"rank": s.lora_rank, "alpha": 2 * s.lora_rank}},
        "sample": {"num_steps": s.num_denoise, "guidance_scale": s.guidance_scale, "noise_level": s.noise_level,
                   "group_size": s.group_size, "batch_size": s.batch_size, "num_batches": s.num_batches},
        "train": {"method": method, "clip_range": s.clip_range, "updates_per_step": s.updates_per_step,
                  "learning_rate": s.learning_rate, "kl_threshold": s.kl_threshold},
        # recorded for the checkpoint's config; the demo injects the same callables with short names
        "rewards": {"proxy": [{"name": "grpo_guard.demo.rewards:ProxyLogit", "kwargs": {"seed": s.reward_seed}}],
                    "gold": [{"name": "grpo_guard.demo.rewards:DigitProb", "kwargs": {"seed": s.reward_seed}},
                             {"name": "grpo_guard.demo.rewards:Realism", "kwargs": {"seed": s.reward_seed}}]},
        "data": {"prompts": [data.prompt_for(d) for d in range(10)]},
        "run": {"output_dir": out_dir, "num_steps": s.steps, "seed": s.seed, "save_every": 0,
                "mixed_precision": "no", "cpu": True, "tensorboard": True, "progress": progress},
    })


@torch.no_grad()
def evaluate(adapter, model, cfg: tconfig.Config, s: Settings, gold_scales=None) -> Dict:
    """Sample the fixed evaluation set and score it. Returns means (gold normalized by ``gold_scales``
    when given) and the images (B, 1, 8, 8) in [0, 1], ordered digit-major. The evaluation noise comes from
    ``s.reward_seed``, not the RL seed: every method and every RL seed is evaluated on the same set."""
    prompts = [data.prompt_for(d) for d in range(10) for _ in range(s.eval_per_digit)]
    ids = list(range(len(prompts)))
    model.eval()
    cfg = copy.copy(cfg)
    cfg.run = dataclasses.replace(cfg.run, seed=s.reward_seed)
    _, final = sample_batch(adapter, model, prompts, cfg, EVAL_STEP, ids, ids)
    images = adapter.decode(final).cpu()
    raw = drw.score_all(images, prompts, s.reward_seed)
    out = {k: float(v.mean()) for k, v in raw.items()}
    if gold_scales:
        for k, scale in gold_scales.items():
            out[k] = out[k] / scale
        out["gold"] = sum(out[k] for k in gold_scales) / len(gold_scales)
    return {"scores": out, "images": images}


def run_method(s: Settings, method: str, out: str, gold_scales: Dict[str, float], progress: bool = True) -> Dict:
    """Train one method; returns its evaluations ``{step: scores}``, images per eval step and wall time."""
    mdir = os.path.join(out, method)
    if os.path.exists(os.path.join(mdir, "metrics.jsonl")):
        raise FileExistsError(f"{mdir} already holds a run; choose another --out")
    cfg = trainer_config(s, method, mdir, progress=False)  # the demo draws its own bar
    proxy, gold = drw.make(s.reward_seed, gold_scales["digit_prob"], gold_scales["realism"])
    adapter = dm.load_adapter(s.weights)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, adapter=adapter, proxy_rewards=proxy, gold_rewards=gold)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=s.steps, desc=f"{method:>12}", dynamic_ncols=True)
    evals, images = {}, {}
    for step in range(0, s.steps + 1):
        if step > 0:
            rec = trainer.step()
            if bar is not None:
                ts = [t for u in rec["updates"][1:] for t in u["timesteps"]] or rec["updates"][0]["timesteps"]
                gold_mean = (rec["reward/gold/digit_prob_mean"] + rec["reward/gold/realism_mean"]) / 2
                bar.set_postfix(proxy=f"{rec['reward/proxy_mean']:.2f}", gold=f"{gold_mean:.3f}",
                                clip=f"{sum(t['clipfrac'] for t in ts) / len(ts):.2f}")
                bar.update(1)
        if step % s.eval_every == 0 or step == s.steps:
            ev = evaluate(trainer.adapter, trainer.adapter.transformer, cfg, s, gold_scales)
            evals[step], images[step] = ev["scores"], ev["images"]
    if bar is not None:
        bar.close()
    trainer.save()
    trainer.logger.close()
    wall = time.perf_counter() - t0
    tmp = os.path.join(mdir, "eval.json.tmp")
    with open(tmp, "w") as f:  # written last and renamed: its presence marks a finished run (the study resumes on it)
        json.dump({"method": method, "evals": evals, "wall_s": wall}, f, indent=1)
    os.replace(tmp, os.path.join(mdir, "eval.json"))
    return {"evals": evals, "images": images, "wall_s": wall}


def base_eval(s: Settings) -> Dict:
    """The base model on the evaluation set: raw scores (the gold normalizers) and images."""
    adapter = dm.load_adapter(s.weights)
    cfg = trainer_config(s, "grpo", os.devnull, progress=False)
    ev = evaluate(adapter, adapter.transformer, cfg, s)
    scales = {"digit_prob": ev["scores"]["digit_prob"], "realism": ev["scores"]["realism"]}
    scores = dict(ev["scores"], digit_prob=1.0, realism=1.0, gold=1.0)
    return {"raw": ev["scores"], "scores": scores, "scales": scales, "images": ev["images"]}


def settings_dict(s: Settings) -> Dict:
    return asdict(s)
