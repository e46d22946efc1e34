"""The trainer optimizes the proxy reward in the right direction, and the trainer is reusable from Python with a
custom model (pixel-space, 1 channel, no VAE) and a plain-callable reward -- the demo's setup."""
import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.models.sd3 import Adapter, tiny_pipeline, tiny_transformer
from grpo_guard.trainer import Reward, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def darkness(images, prompts, metadata):
    return -images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("reward", [brightness, darkness])
def test_guard_moves_the_reward_the_right_way(reward, tmp_path):
    """8 steps of GRPO-Guard raise brightness, or lower it for the negated reward (measured on deterministic
    ODE samples before and after): a sign error anywhere in rollout / advantages / update fails one of them."""
    cfg = tiny("sd3", tmp_path, "train.method=guard", "train.clip_range=1.0e-3", "train.learning_rate=0.03",
               "sample.num_batches=4", "train.updates_per_step=2", "model.lora.rank=8", "run.save_every=0", steps=8)
    t = Trainer(cfg, proxy_rewards=[Reward("b", reward)], gold_rewards=[])
    before = t.evaluate(t.prompts)["eval/b_mean"]
    t.train()
    after = t.evaluate(t.prompts)["eval/b_mean"]
    assert after - before > 0.002, (before, after)
    assert all(u["skipped"] == 0 for u in t.last_record["updates"])


def test_pixel_space_custom_transformer(tmp_path):
    """Trainer(cfg, adapter=...) with a 1-channel pixel-space transformer (8x8 'images'), no VAE."""
    transformer = tiny_transformer(seed=3, sample_size=8, in_channels=1)
    adapter = Adapter(tiny_pipeline(transformer=transformer, with_vae=False), resolution=8, max_sequence_length=16)
    assert adapter.latent_shape() == (1, 8, 8)
    cfg = tiny("sd3", tmp_path, "model.resolution=8", "run.save_every=0", steps=1)
    seen = []

    def labelled(images, prompts, metadata):
        seen.extend(zip(prompts, metadata))
        return brightness(images, prompts, metadata)

    t = Trainer(cfg, adapter=adapter, proxy_rewards=[Reward("b", labelled)], gold_rewards=[],
                prompts=["digit 0", "digit 1"], metadata=[{"label": 0}, {"label": 1}])
    rec = t.step()
    b = t.last_batches[0]
    assert b.latents.shape[2:] == (1, 8, 8)
    assert rec["updates"][0]["timesteps"][0]["ratio_mean"] == 1.0
    assert torch.isfinite(torch.tensor(rec["reward/b_mean"]))
    assert len(seen) == 8 and all(p == f"digit {m['label']}" for p, m in seen)  # metadata follows its prompt


def test_trainer_benchmark_script_runs(tmp_path):
    """benchmarks/bench_trainer.py (the GPU trainer-step timing) stays runnable: its --tiny CPU mode."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trainer.py"
    spec = importlib.util.spec_from_file_location("bench_trainer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for model, shape in (("sd3", [4, 8, 8]), ("wan", [4, 3, 4, 4])):
        mod.main(["--tiny", "--model", model, "--steps", "1", "--backends", "torch", "--out", str(tmp_path / "r.json")])
        (row,) = json.loads((tmp_path / "r.json").read_text())
        assert row["ran"] == "torch" and row["samples_per_s"] > 0 and 0 < row["ops_share"] < 1
        assert row["model"] == model and row["latent_shape"] == shape
