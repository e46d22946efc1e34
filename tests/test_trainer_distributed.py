"""Two CPU processes (torchrun + Accelerator(cpu=True)): identical weights on both ranks after training, and groups
spanning ranks get the advantages a single-process run with the same global batch computes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _trainer import CONFIGS, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
STEPS = 2


def _run_two_processes(out: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_trainer_dist_worker.py"), str(out), str(STEPS), str(CONFIGS / "tiny_sd3.yaml"),
           "sample.batch_size=2", "sample.num_batches=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_match_one(tmp_path):
    ranks = _run_two_processes(tmp_path / "dist")
    assert [r["world"] for r in ranks] == [2, 2]
    # identical weights on both ranks
    for n, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][n]), n

    # one process, same global batch (2 processes x 2 micro-batches x 2 images = 1 x 4 x 2)
    single = Trainer(tiny("sd3", tmp_path / "single", "sample.batch_size=2", "sample.num_batches=4",
                          "run.save_every=0", steps=STEPS))
    for step in range(STEPS):
        single.step()
        ids = torch.cat([b.sample_ids for b in single.last_batches])
        adv = torch.cat([b.advantages for b in single.last_batches])
        groups = torch.cat([b.group_ids for b in single.last_batches])
        h = [r["history"][step] for r in ranks]
        # the ranks hold disjoint halves of the step's samples, and some group spans both ranks
        assert torch.equal(torch.cat([h[0]["sample_ids"], h[1]["sample_ids"]]), ids)
        assert set(h[0]["group_ids"].tolist()) & set(h[1]["group_ids"].tolist())
        assert torch.equal(torch.cat([h[0]["group_ids"], h[1]["group_ids"]]), groups)
        # every rank used its slice of the advantages computed over the gathered group
        for r in range(2):
            g = h[r]["gathered"]
            assert torch.equal(g["advantages"][r * 4:(r + 1) * 4], h[r]["advantages"])
        dist_adv = torch.cat([h[0]["advantages"], h[1]["advantages"]])
        if step == 0:  # same weights, same micro-batches, same noise: bit-identical rollouts
            assert torch.equal(dist_adv, adv)
        else:  # after one update the 2-process gradient average differs from 1 process only in rounding
            torch.testing.assert_close(dist_adv, adv, atol=1e-3, rtol=0)
    for n, p in single.named_params.items():
        torch.testing.assert_close(ranks[0]["weights"][n], p.detach(), atol=1e-6, rtol=1e-4)
