"""The metrics file: reward means/stds (proxy and gold) and, per trained timestep, ratio mean/std, clip fraction,
approx KL and that timestep's own gradient norm (checked against a direct autograd computation)."""
import os

import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

import grpo_guard as gg
from grpo_guard.trainer import Trainer
from grpo_guard.trainer.metrics import flatten, read

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEP_FIELDS = {"index", "sigma", "dt", "loss", "ratio_mean", "ratio_std", "clipfrac", "approx_kl", "kl",
                   "grad_norm"}


def test_metrics_jsonl_and_tensorboard(tmp_path):
    t = Trainer(tiny("flux", tmp_path, "run.tensorboard=true", "run.save_every=0", "train.updates_per_step=2",
                     steps=2))
    t.train()
    recs = read(str(tmp_path / "metrics.jsonl"))
    assert len(recs) == 2
    for r in recs:
        for name in ("proxy", "brightness", "gold/jpeg_compressibility"):
            assert f"reward/{name}_mean" in r and f"reward/{name}_std" in r
        assert len(r["updates"]) == 2
        for u in r["updates"]:
            assert {"grad_norm", "skipped", "lr", "timesteps"} <= set(u)
            assert [ts["index"] for ts in u["timesteps"]] == [0, 1, 2]
            for ts in u["timesteps"]:
                assert set(ts) == TIMESTEP_FIELDS
                assert ts["grad_norm"] > 0 and ts["dt"] < 0 and 0 <= ts["clipfrac"] <= 1
    flat = flatten(recs[0])
    assert {"t0/ratio_mean", "t2/grad_norm", "train/grad_norm", "reward/proxy_mean"} <= set(flat)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_timestep_grad_norm_is_that_timesteps_gradient(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=0", "train.method=guard", steps=1))
    batches = t.rollout()
    t.advantages(batches)
    cfg, K, nb = t.cfg, len(batches[0].steps), len(batches)
    expected = []
    for k in range(K):
        total = 0
        for b in batches:
            v = t.adapter.velocity(t.model, b.latents[:, k], b.sigmas[k], b.cond, cfg.sample.guidance_scale)
            loss, _ = gg.policy_loss(v, b.latents[:, k], b.latents[:, k + 1], b.sigmas[k], b.sigmas[k + 1],
                                     b.advantages, old_model_output=b.old_velocity[:, k],
                                     noise_level=cfg.sample.noise_level, method="guard",
                                     clip_range=cfg.train.clip_range)
            total = total + loss / (K * nb)
        grads = torch.autograd.grad(total, t.params)
        expected.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
    (upd,) = t.update(batches)
    got = [ts["grad_norm"] for ts in upd["timesteps"]]
    assert got == pytest.approx(expected, rel=1e-4)
    # Guard's 1/|dt| reweighting: the weights of the trained steps are the reciprocals of the logged |dt|
    assert all(ts["dt"] == pytest.approx(b - a) for ts, a, b in
               zip(upd["timesteps"], batches[0].sigmas[:-1], batches[0].sigmas[1:]))
