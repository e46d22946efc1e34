"""Worker of test_trainer_fsdp.py and test_trainer_deepspeed.py (2 CPU processes): a tiny config under FSDP2
or DeepSpeed ZeRO-1/2. argv: mode (fsdp2 | deepspeed) output_dir config [--set ...].

- fsdp2 (run under torchrun): accelerate 1.15 never selects FSDP for CPU processes (its state only turns
  MULTI_GPU-like types into FSDP), so the worker forces the distributed type after building the Accelerator;
  ``prepare`` then shards the transformer with ``fully_shard`` over gloo exactly as it does over NCCL.
- deepspeed (run under ``accelerate launch --use_deepspeed``): the trainer builds its own Accelerator, as for a
  user; DeepSpeed's CPU accelerator runs over gloo.

Saves per rank: the whole trained weights (float32 masters under DeepSpeed) after 2 steps, after a 3rd step, and
after resuming the step-2 checkpoint in a fresh Trainer and running the 3rd step again; the per-timestep metrics
of every update; then a 4th step whose loss is infinite (with finite gradients) on rank 1 only.
"""
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from grpo_guard.trainer import Trainer, config
from grpo_guard.trainer import sharding, zero


BLOCKS = {"sd3": ["JointTransformerBlock"], "flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
          "wan": ["WanTransformerBlock"]}


def fsdp2_accelerator(family):
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=BLOCKS[family])
    acc = Accelerator(cpu=True, mixed_precision="no", fsdp_plugin=plugin)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def whole(trainer):
    if trainer.deepspeed:
        return {n: w.cpu().clone() for n, w in zip(trainer.named_params, zero.full_params(trainer.params))}
    return {n: sharding.full(p.detach()).cpu().clone() for n, p in trainer.named_params.items()}


def main():
    mode, out = sys.argv[1], sys.argv[2]
    cfg = config.load(sys.argv[3], [f"run.output_dir={out}", "run.num_steps=4", "run.progress=false",
                                    "run.cpu=true", "run.save_every=0", *sys.argv[4:]])
    if mode == "fsdp2":
        acc = fsdp2_accelerator(cfg.model.family)
        t = Trainer(cfg, accelerator=acc)
        assert sharding.is_fsdp2(acc) and t.sharded and all(sharding.is_sharded(p) for p in t.params)
    else:
        t = Trainer(cfg)  # accelerate launch --use_deepspeed: the trainer's own Accelerator
        acc = t.acc
        assert t.deepspeed and type(t.model).__name__ == "DeepSpeedEngine"
    records = [t.step(), t.step()]
    after2 = whole(t)
    t.save()
    records.append(t.step())
    after3 = whole(t)
    evaluation = t.evaluate(prompts=["a red cat", "digit 7", "a blue dog"])  # 3 prompts: rank 1 idles once
    media = sorted(os.listdir(os.path.join(out, "eval"))) if acc.is_main_process else None  # written by rank 0

    resumed = Trainer(cfg, accelerator=acc)
    assert resumed.resume() and resumed.global_step == 2
    reloaded = whole(resumed)
    resumed.step()
    resumed3 = whole(resumed)

    # a non-finite loss on rank 1 only: both ranks must skip the step (the backward still runs: a collective)
    import grpo_guard
    real = grpo_guard.policy_loss

    def inf_on_rank1(*args, **kwargs):  # an infinite loss whose gradients are finite: the hardest case to skip
        loss, stats = real(*args, **kwargs)
        return (loss + float("inf") if acc.process_index == 1 else loss), stats

    grpo_guard.policy_loss = inf_on_rank1
    nan_record = resumed.step()["updates"][0]
    grpo_guard.policy_loss = real
    torch.save({"after2": after2, "after3": after3, "reloaded": reloaded, "resumed3": resumed3,
                "nan_record": nan_record, "after_nan": whole(resumed),
                "records": [r["updates"] for r in records], "evaluation": evaluation, "media": media,
                "advantages": [b.advantages.cpu() for b in t.last_batches], "world": acc.num_processes,
                "param_dtype": str(t.params[0].dtype),
                "files": sorted(os.listdir(os.path.join(t.checkpoint_dir, "step-00000002")))},
               f"{out}/rank{acc.process_index}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
