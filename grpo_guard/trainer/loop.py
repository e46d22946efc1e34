"""The training loop. One step reads top to bottom: rollout -> rewards -> group advantages -> update(s).

    from grpo_guard.trainer import Trainer, config
    trainer = Trainer(config.load("configs/tiny_sd3.yaml"))
    trainer.train()                       # or trainer.step() one at a time

Model construction, rewards and prompts can be injected (``Trainer(cfg, adapter=..., proxy_rewards=[...],
gold_rewards=[...], prompts=[...])``), so other code (the demo) reuses the loop with its own pieces.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import grpo_guard as gg

from ..models import FlowAdapter, build_adapter
from ..models.base import DTYPES, AdapterConfigError, family_module
from . import checkpoint, media, rewards as rw, sharding, zero
from .config import Config, ConfigError, validate
from .metrics import MetricsLogger
from .rollout import RolloutBatch, generate, plan_step, sample_batch
from .update import EMA, Updater, check_distributed


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def load_prompts(cfg: Config):
    """(prompts, metadata) from ``data.prompts`` or ``data.prompt_file`` (.txt lines / .jsonl objects)."""
    if cfg.data.prompts:
        return list(cfg.data.prompts), [{} for _ in cfg.data.prompts]
    path = cfg.data.prompt_file
    if not os.path.isfile(path):
        raise ConfigError(f"data.prompt_file not found: {path}")
    prompts, meta = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                prompts.append(obj.pop("prompt"))
                meta.append(obj)
            else:
                prompts.append(line.strip())
                meta.append({})
    if not prompts:
        raise ConfigError(f"data.prompt_file {path} has no prompts")
    return prompts, meta


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = cfg.run.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)]
    if zero.requested():  # accelerate ignores DeepSpeed when cpu=True; DeepSpeed picks the device itself
        if torch.cuda.is_available() and cpu:
            raise ConfigError("run.cpu: true (or ACCELERATE_USE_CPU) with a DeepSpeed launch on a machine with "
                              "CUDA: DeepSpeed would train on the GPUs; set run.cpu: false, or launch without "
                              "DeepSpeed")
        cpu = False
        if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator: accelerate must be told gloo
            from accelerate.utils import InitProcessGroupKwargs
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=cpu, mixed_precision=cfg.run.mixed_precision, kwargs_handlers=handlers)


def add_lora(adapter: FlowAdapter, cfg: Config) -> None:
    """Add a LoRA adapter (peft, gaussian init, B = 0 so the model starts unchanged) to the transformer."""
    from peft import LoraConfig

    targets = cfg.model.lora.target_modules or family_module(adapter.family).LORA_TARGETS
    adapter.transformer.add_adapter(LoraConfig(r=cfg.model.lora.rank, lora_alpha=cfg.model.lora.alpha,
                                               init_lora_weights="gaussian", target_modules=targets))


class Trainer:
    """Flow-GRPO / GRPO-Guard on one diffusers flow-matching model, single or multi-process (accelerate)."""

    def __init__(self, cfg: Config, adapter: Optional[FlowAdapter] = None,
                 proxy_rewards: Optional[Sequence[rw.Reward]] = None,
                 gold_rewards: Optional[Sequence[rw.Reward]] = None,
                 prompts: Optional[Sequence[str]] = None, metadata: Optional[Sequence[dict]] = None,
                 accelerator=None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        check_distributed(self.acc)  # before any model is built or prepared
        validate(cfg, world_size=self.acc.num_processes)
        self.deepspeed = zero.is_deepspeed(self.acc)
        if self.deepspeed:
            zero.configure(self.acc, cfg)
        if sharding.is_fsdp2(self.acc):
            sharding.check(self.acc, cfg)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)  # (the trainer draws from torch only; rewards may use python / numpy)
        np.random.seed(cfg.run.seed)
        if prompts is None:
            self.prompts, self.metadata = load_prompts(cfg)
        else:
            self.prompts, self.metadata = list(prompts), list(metadata or [{} for _ in prompts])
        # rewards before the model: one that cannot be built, or that scores images for a video model, fails fast
        self.proxy = list(proxy_rewards) if proxy_rewards is not None else rw.from_specs(cfg.rewards.proxy)
        self.gold = list(gold_rewards) if gold_rewards is not None else rw.from_specs(cfg.rewards.gold)
        modality = adapter.modality if adapter is not None else family_module(cfg.model.family).Adapter.modality
        rw.check_modality(self.proxy, modality, "proxy")
        rw.check_modality(self.gold, modality, "gold")
        try:
            self.adapter = adapter or build_adapter(cfg.model, seed=cfg.run.seed)
            # FSDP2 and DeepSpeed run collectives inside the forward / backward: every process in lockstep
            self.adapter.configure(cfg.sample, lockstep=self.deepspeed or sharding.is_fsdp2(self.acc))
        except AdapterConfigError as exc:
            raise ConfigError(str(exc)) from None
        self.adapter.to(self.acc.device)
        self._setup_model()
        self.logger = MetricsLogger(cfg.run.output_dir, self.acc.is_main_process, cfg.run.tensorboard)
        self.global_step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_total = 0
        self.last_batches: List[RolloutBatch] = []
        self.last_record: Dict = {}
        self.last_gathered: Dict[str, torch.Tensor] = {}

    # --- setup ---------------------------------------------------------------------------------------
    def _setup_model(self):
        cfg, t = self.cfg, self.cfg.train
        transformer = self.adapter.transformer
        transformer.requires_grad_(False)
        ref_copy = None
        if cfg.model.use_lora:
            add_lora(self.adapter, cfg)
        else:
            if t.beta_kl > 0:
                import copy
                ref_copy = copy.deepcopy(transformer).eval()  # frozen reference for the KL term
            transformer.requires_grad_(True)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        for p in named.values():
            p.data = p.data.float()  # trained weights (LoRA or full) in float32; frozen base stays in model.dtype
        self.named_params = named
        self.params = list(named.values())
        optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_eps)
        warm = t.warmup_steps
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.sharded = sharding.is_fsdp2(self.acc)
        if self.sharded:
            sharding.full_precision_gradient_reduction(self.acc)
        self.model, self.optimizer = self.acc.prepare(transformer, optimizer)
        # the velocity in the forwards' compute dtype: its values are of that dtype, so the rollout stores it in
        # the fewest bytes and the update recomputes it bit for bit (FlowAdapter.velocity_dtype)
        self.adapter.velocity_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.acc.mixed_precision, DTYPES[cfg.model.dtype])
        self.lr_scheduler = lr_scheduler  # stepped once per optimizer step by the Updater (not prepared)
        if self.sharded:  # FSDP2 shards in place: the trained parameters are now DTensors, the names unchanged
            sharded = {n: p for n, p in self.acc.unwrap_model(self.model).named_parameters() if p.requires_grad}
            if list(sharded) != list(named):
                raise RuntimeError("FSDP2 changed the trained parameters' names: "
                                   f"{sorted(set(named) ^ set(sharded))[:4]}")
            self.named_params, self.params = sharded, list(sharded.values())
        if self.deepspeed:  # ZeRO-1/2 keep the module's Parameter objects (their data now in flat buffers)
            trained = [q for q in self.model.module.parameters() if q.requires_grad]
            if len(trained) != len(self.params) or any(p is not q for p, q in zip(self.params, trained)):
                raise RuntimeError("DeepSpeed replaced the trained parameters")
        self.ema = EMA(self.params, t.ema_decay, t.ema_update_interval) if t.ema else None
        if t.beta_kl > 0 and cfg.model.use_lora:
            reference, ref_model = self._lora_disabled, transformer
        elif t.beta_kl > 0:
            from contextlib import nullcontext
            reference, ref_model = nullcontext, ref_copy
        else:
            reference, ref_model = None, None
        self.updater = Updater(cfg, self.acc, self.adapter, self.model, self.params, self.optimizer,
                               self.lr_scheduler, ema=self.ema, reference=reference, ref_model=ref_model)

    def _lora_disabled(self):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self.adapter.transformer.disable_adapters()
            try:
                yield
            finally:
                self.adapter.transformer.enable_adapters()
        return ctx()

    # --- one step: rollout -> rewards -> advantages -> update -----------------------------------------
    def rollout(self) -> List[RolloutBatch]:
        """Sample this process's micro-batches and score them (proxy and gold rewards)."""
        batches = []
        plan = plan_step(self.global_step, len(self.prompts), self.cfg, self.acc.num_processes, self.acc.process_index)
        self.adapter.transformer.eval()
        for mb in plan:
            prompts = [self.prompts[s.prompt_index] for s in mb]
            meta = [dict(self.metadata[s.prompt_index]) for s in mb]
            batch, final = sample_batch(self.adapter, self.adapter.transformer, prompts, self.cfg, self.global_step,
                                        [s.sample_id for s in mb], [s.group_id for s in mb], meta,
                                        autocast=self.updater.autocast)
            batch.rewards, _ = self._score(final, prompts, meta)
            batch.proxy_reward = rw.weighted_sum(batch.rewards, self.proxy)
            batches.append(batch)
        return batches

    def _score(self, final: torch.Tensor, prompts, meta, keep_pixels: bool = False):
        """Every proxy and gold reward of final latents ``final`` (name -> (B,)), and the decoded images / frames
        (None unless some reward reads pixels or ``keep_pixels``): the decode runs only when needed."""
        rewards = self.proxy + self.gold
        pixels = self.adapter.decode(final) if keep_pixels or rw.needs_pixels(rewards) else None
        latents = self.adapter.unpack(final) if rw.needs_latents(rewards) else None
        return rw.evaluate(rewards, pixels, prompts, meta, latents=latents), pixels

    def advantages(self, batches: List[RolloutBatch]) -> Dict[str, torch.Tensor]:
        """Group-relative advantages over the rewards gathered from every process (groups span processes)."""
        local_r = torch.cat([b.proxy_reward for b in batches]).float()
        local_g = torch.cat([b.group_ids for b in batches])
        local_g = local_g.pin_memory().to(local_r.device, non_blocking=True) if local_r.is_cuda else local_g
        all_r, all_g = self.acc.gather(local_r), self.acc.gather(local_g)
        if self.cfg.sample.group_size == 1:  # flow_grpo's fallback: normalize over the whole batch, not per group
            all_g = torch.zeros_like(all_g)
        adv = gg.group_advantages(all_r, all_g, global_std=self.cfg.sample.global_std)
        n = local_r.numel()
        mine = adv[self.acc.process_index * n:(self.acc.process_index + 1) * n]
        offset = 0
        for b in batches:
            b.advantages = mine[offset:offset + len(b.prompts)].to(self.adapter.device)
            offset += len(b.prompts)
        return {"rewards": all_r, "group_ids": all_g, "advantages": adv}

    def select(self, batches: List[RolloutBatch]) -> List[RolloutBatch]:
        """What each optimizer step trains, with each micro-batch's share of that step's loss (``loss_weight``).
        ``train.updates_per_step`` steps, each over an equal share of the micro-batches. With
        ``train.drop_zero_advantages`` (flow_grpo) only samples whose advantage is not 0 are trained (they carry
        no gradient but would dilute the mean): a micro-batch keeps its non-zero samples and weighs by their
        count, so each step's loss is the mean over its kept samples, as flow_grpo's equal-size re-batching
        gives. A micro-batch left without any keeps one sample at weight 0 (every process runs the same number
        of forwards, which FSDP2 and DeepSpeed need). One host read of the advantages."""
        per = len(batches) // self.cfg.train.updates_per_step
        if not self.cfg.train.drop_zero_advantages:
            for b in batches:
                b.loss_weight = 1.0 / per
            return batches
        nonzero = (torch.cat([b.advantages for b in batches]) != 0).cpu().tolist()
        out, offset = [], 0
        for u in range(0, len(batches), per):
            kept = []
            for b in batches[u:u + per]:
                kept.append([i for i in range(len(b)) if nonzero[offset + i]])
                offset += len(b)
            total = sum(len(k) for k in kept)
            for b, k in zip(batches[u:u + per], kept):
                sub = b.select(k or [0]) if len(k) != len(b) else b
                sub.loss_weight = len(k) / total if total else 0.0
                out.append(sub)
        return out

    def update(self, batches: List[RolloutBatch]) -> List[Dict]:
        """``train.updates_per_step`` optimizer steps, each over an equal share of the micro-batches (weighted by
        their ``loss_weight``, :meth:`select`)."""
        self.adapter.transformer.eval()  # no dropout: the recomputed velocity must equal the rollout's
        n = len(batches) // self.cfg.train.updates_per_step
        out = []
        for u in range(self.cfg.train.updates_per_step):
            res = self.updater.step(batches[u * n:(u + 1) * n])
            self.skipped_total += res["skipped"]
            # a skip of fp16's loss scaler (overflow, it lowers its scale) is routine, not a failure
            failed = res["skipped"] and not res["overflow"]
            self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if failed else 0
            out.append(res)
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                    f"(step {self.global_step}); lower train.learning_rate, check the rewards, or use float32")
        return out

    def step(self) -> Dict:
        """One training step (plus an evaluation every ``run.eval_every``); returns and logs its metrics."""
        t0 = time.perf_counter()
        batches = self.rollout()
        t1 = time.perf_counter()
        gathered = self.advantages(batches)
        trained = self.select(batches)
        updates = self.update(trained)
        t2 = time.perf_counter()
        record = self._record(batches, gathered, updates, t1 - t0, t2 - t1)
        record["trained_fraction"] = sum(len(b) for b in trained if b.loss_weight) / sum(len(b) for b in batches)
        self.global_step += 1
        if self.cfg.run.eval_every and self.global_step % self.cfg.run.eval_every == 0:
            record.update(self.evaluate())
        self.last_batches, self.last_record, self.last_gathered = batches, record, gathered
        self.logger.log(self.global_step, record)
        return record

    def _record(self, batches, gathered, updates, t_rollout, t_update) -> Dict:
        rec = {}
        names = [r.name for r in self.proxy + self.gold]
        local = {n: torch.cat([b.rewards[n] for b in batches]) for n in names}
        local["proxy"] = torch.cat([b.proxy_reward for b in batches])
        for n, v in local.items():
            allv = self.acc.gather(v.float())
            kind = "gold/" if n in {r.name for r in self.gold} else ""
            rec[f"reward/{kind}{n}_mean"] = float(allv.mean())
            rec[f"reward/{kind}{n}_std"] = float(allv.std(unbiased=False))
        rec["updates"] = updates
        rec["skipped_total"] = self.skipped_total
        rec["time/rollout_s"] = t_rollout
        rec["time/update_s"] = t_update
        rec["stored_mib"] = sum(b.stored_bytes() for b in batches) / 2 ** 20
        return rec

    @torch.no_grad()
    def evaluate(self, prompts: Optional[Sequence[str]] = None, use_ema: bool = True) -> Dict[str, float]:
        """Deterministic ODE samples of ``prompts`` (default: ``data.eval_prompts``, else the first
        ``sample.batch_size`` training prompts), split over processes, with the EMA weights when kept. Returns
        ``eval/<reward>_mean`` for every proxy and gold reward (and ``eval/proxy_mean``)."""
        cfg = self.cfg
        prompts = list(prompts or cfg.data.eval_prompts or self.prompts[:cfg.sample.batch_size])
        r, w = self.acc.process_index, self.acc.num_processes
        idx = list(range(len(prompts)))[r::w]
        model = self.model if self.sharded else None
        sharding.reshard(model)  # the EMA swap below writes the sharded parameters
        ema = self.ema.applied(self.params) if (use_ema and self.ema is not None) else contextlib.nullcontext()
        sums = torch.zeros(len(self.proxy) + len(self.gold) + 2, dtype=torch.float64, device=self.adapter.device)
        bs = cfg.sample.batch_size
        # under FSDP2 every forward is a collective: every process runs as many batches as the busiest one
        busiest = -(-len(prompts) // w)  # prompts of process 0
        n_batches = -(-(busiest if self.sharded else len(idx)) // bs)
        saved, pixels = [], []  # process 0's first run.eval_media samples, written as a strip (media.py)
        with ema:
            for i in range(0, n_batches * bs, bs):
                chunk, weight = idx[i:i + bs], 1.0
                if not chunk:  # an idle process's stand-in batch, not counted
                    chunk, weight = [0], 0.0
                ps = [prompts[k] for k in chunk]
                x = generate(self.adapter, self.adapter.transformer, ps, cfg, chunk, cfg.run.eval_num_steps or None,
                             autocast=self.updater.autocast)
                keep = weight and r == 0 and len(saved) < cfg.run.eval_media
                vals, decoded = self._score(x, ps, [{} for _ in ps], keep_pixels=keep)
                if keep:  # only what is written, on the host (the rest of the evaluation's memory stays free)
                    n = min(len(ps), cfg.run.eval_media - len(saved))
                    pixels.append(decoded[:n].cpu())
                    saved += ps[:n]
                proxy = rw.weighted_sum(vals, self.proxy)
                cols = [vals[q.name] for q in self.proxy + self.gold] + [proxy, torch.ones_like(proxy)]
                sums += weight * torch.stack([c.double().sum() for c in cols])
            sharding.reshard(model)  # drop the gathered (EMA) copies before the EMA context restores the weights
        sums = self.acc.reduce(sums, reduction="sum") if w > 1 else sums
        if saved:  # after the collective: a failed write cannot leave the other processes waiting
            try:
                media.save_eval(os.path.join(cfg.run.output_dir, "eval"), self.global_step, torch.cat(pixels), saved)
            except OSError as exc:
                warnings.warn(f"evaluation images not written: {exc}")
        names = [q.name if q in self.proxy else f"gold/{q.name}" for q in self.proxy + self.gold] + ["proxy"]
        return {f"eval/{n}_mean": float(sums[j] / sums[-1]) for j, n in enumerate(names)}

    # --- checkpoints and the whole run ---------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.cfg.run.output_dir, "checkpoints")

    def save(self) -> str:
        state = {"skipped_total": self.skipped_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "config": self.cfg.to_dict()}
        return checkpoint.save(self.checkpoint_dir, self.global_step, self.acc, self.named_params, self.optimizer,
                               self.lr_scheduler, state, self.ema.shadow if self.ema else None, self.cfg.run.keep_last,
                               model=self.model if self.sharded else None,
                               engine=self.model if self.deepspeed else None)

    def export_lora(self, directory: str, use_ema: Optional[bool] = None) -> str:
        """Write the trained LoRA in diffusers' format (``pipe.load_lora_weights(directory)`` loads it; Wan 2.2's
        low-noise expert: ``load_lora_weights(directory, load_into_transformer_2=True)``; both experts: one LoRA each
        in ``directory/high`` and ``directory/low``); main process only. ``use_ema`` (default: when ``train.ema``)
        writes the EMA weights, as flow_grpo saves its LoRA. Returns the directory."""
        if not self.cfg.model.use_lora:
            raise ValueError("export_lora needs model.use_lora: true (full fine-tuning: save the transformer)")
        if use_ema and self.ema is None:
            raise ValueError("export_lora(use_ema=True) needs train.ema: true")
        from peft.utils import get_peft_model_state_dict

        use_ema = self.ema is not None if use_ema is None else use_ema
        model = self.model if self.sharded else None
        # Wan 2.2 A14B with model.expert both: one LoRA per expert, in <directory>/high and <directory>/low
        trained = self.adapter.transformer
        parts = [("high", trained.high), ("low", trained.low)] if hasattr(trained, "high") else [("", trained)]
        sharding.reshard(model)  # the EMA swap writes the sharded parameters
        with self.ema.applied(self.params) if use_ema else contextlib.nullcontext():
            layers = [{n: sharding.full(t).clone() for n, t in get_peft_model_state_dict(m).items()} for _, m in parts]
            sharding.reshard(model)  # drop gathered copies before the EMA context restores the weights
        if self.acc.is_main_process:  # (the gather above is collective under FSDP2)
            for (sub, m), lay in zip(parts, layers):
                meta = m.peft_config["default"].to_dict()  # keeps alpha (scale = alpha / r)
                type(self.adapter.pipe).save_lora_weights(os.path.join(directory, sub), transformer_lora_layers=lay,
                                                          transformer_lora_adapter_metadata=meta)
        self.acc.wait_for_everyone()
        return directory

    def resume(self, path: Optional[str] = None) -> bool:
        """Load ``path`` or the latest complete checkpoint of this run; False if there is none."""
        path = path or checkpoint.latest(self.checkpoint_dir)
        if path is None:
            return False
        state = checkpoint.load(path, self.acc, self.named_params, self.optimizer, self.lr_scheduler,
                                self.ema.shadow if self.ema else None, model=self.model if self.sharded else None,
                                engine=self.model if self.deepspeed else None)
        self.global_step = state["step"]
        self.skipped_total, self.nonfinite_in_a_row = state["skipped_total"], state["nonfinite_in_a_row"]
        self.logger.truncate_after(self.global_step)
        return True

    def train(self, num_steps: Optional[int] = None) -> Dict:
        """Run until ``num_steps`` (default ``run.num_steps``) training steps are done; checkpoint every
        ``run.save_every`` steps and at the end. Returns the last metrics record."""
        total = self.cfg.run.num_steps if num_steps is None else num_steps
        bar = None
        if self.cfg.run.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.global_step, desc="grpo-guard", dynamic_ncols=True)
        every = self.cfg.run.save_every
        while self.global_step < total:
            rec = self.step()
            if bar is not None:
                t = [ts for u in rec["updates"] for ts in u["timesteps"]]
                bar.set_postfix(proxy=f"{rec['reward/proxy_mean']:.4g}",
                                ratio=f"{sum(d['ratio_mean'] for d in t) / len(t):.6f}",
                                clip=f"{sum(d['clipfrac'] for d in t) / len(t):.2f}",
                                gnorm=f"{rec['updates'][-1]['grad_norm']:.3g}")
                bar.update(1)
            if (every and self.global_step % every == 0) or self.global_step == total:
                self.save()
        if bar is not None:
            bar.close()
        self.logger.close()
        return self.last_record
