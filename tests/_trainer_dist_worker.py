"""Worker of test_trainer_distributed.py (run under torchrun): trains the tiny SD3 config on the CPU and saves,
per rank, what the test compares. argv: output_dir steps [--set ...]."""
import sys

import torch

from grpo_guard.trainer import Trainer, config


def main():
    out, steps, cfg_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = config.load(cfg_path, [f"run.output_dir={out}", f"run.num_steps={steps}", "run.progress=false",
                                 "run.cpu=true", "run.save_every=0", *sys.argv[4:]])
    t = Trainer(cfg)
    history = []
    for _ in range(steps):
        t.step()
        history.append({
            "sample_ids": torch.cat([b.sample_ids for b in t.last_batches]),
            "group_ids": torch.cat([b.group_ids for b in t.last_batches]),
            "advantages": torch.cat([b.advantages for b in t.last_batches]).cpu(),
            "rewards": torch.cat([b.proxy_reward for b in t.last_batches]).cpu(),
            "gathered": {k: v.cpu() for k, v in t.last_gathered.items()},
        })
    weights = {n: p.detach().cpu().clone() for n, p in t.named_params.items()}
    torch.save({"history": history, "weights": weights, "world": t.acc.num_processes},
               f"{out}/rank{t.acc.process_index}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
