"""End to end on the tiny offline SD3 and Flux pipelines: rollout, rewards, update, log, checkpoint; and the
on-policy ratio (exactly 1 at the first update after a rollout, for every method)."""
import json

import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import Reward, Trainer, checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_end_to_end(family, tmp_path):
    cfg = tiny(family, tmp_path, "run.save_every=0", steps=2)
    trainer = Trainer(cfg)
    init = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    assert init and all("lora" in n for n in init), "LoRA by default: only adapter weights are trained"
    last = trainer.train()
    # the weights moved (LoRA B starts at 0 and must have been updated)
    moved = [n for n, p in trainer.named_params.items() if not torch.equal(p, init[n])]
    assert any("lora_B" in n for n in moved)
    # metrics: one line per step, finite rewards, per-timestep fields for the 3 trained steps of 4
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        for key in ("reward/brightness_mean", "reward/gold/jpeg_compressibility_mean", "reward/proxy_std"):
            assert torch.isfinite(torch.tensor(r[key]))
        ts = r["updates"][0]["timesteps"]
        assert [t["index"] for t in ts] == [0, 1, 2]
    # storage: per trained step x_j + v_old (D float32 each), plus one final latent, 8 samples
    D = 256
    assert last["stored_mib"] * 2 ** 20 == 8 * ((3 + 1) * D * 4 + 3 * D * 4)  # latents + velocities, no more
    # the checkpoint written at the end is complete and holds the trained weights
    path = checkpoint.latest(trainer.checkpoint_dir)
    assert path.endswith("step-00000002")
    from safetensors.torch import load_file
    saved = load_file(f"{path}/weights.safetensors")
    assert set(saved) == set(trainer.named_params)
    for n, p in trainer.named_params.items():
        assert torch.equal(saved[n], p.detach().cpu())


@pytest.mark.parametrize("family,method,dynamics", [
    ("sd3", "guard", "flow"), ("sd3", "grpo", "flow"), ("sd3", "mean_revised", "flow"), ("sd3", "ratio_norm", "flow"),
    ("flux", "guard", "flow"), ("flux", "guard", "dance"), ("sd3", "grpo", "cps"),
    ("flux", "guard", "flow-bf16"), ("sd3", "guard", "flow-bf16"),
    ("wan", "guard", "flow"), ("wan", "dppo", "flow"), ("wan", "guard", "flow-bf16"), ("wan", "grpo", "flow-bf16")])
def test_on_policy_ratio_is_exactly_one(family, method, dynamics, tmp_path):
    """First update after a rollout: ratio exactly 1 (mean 1, std 0, nothing clipped) at every timestep. The
    second update of the same rollout is off-policy, so its ratio must differ: the check can fail. bf16 models
    included (a strided bf16 input to a Linear rounds differently from the contiguous one the rollout used), and Wan
    video (CFG as two forwards)."""
    dynamics, _, bf16 = dynamics.partition("-")
    extra = ["model.dtype=bfloat16"] if bf16 else []
    cfg = tiny(family, tmp_path, f"train.method={method}", f"sample.dynamics={dynamics}", "train.updates_per_step=2",
               "train.learning_rate=0.05", "run.save_every=0", *extra, steps=1)
    rec = Trainer(cfg).step()
    first, second = rec["updates"]
    for t in first["timesteps"]:
        assert t["ratio_mean"] == 1.0 and t["ratio_std"] == 0.0 and t["clipfrac"] == 0.0 and t["approx_kl"] == 0.0
    assert first["skipped"] == 0 and first["grad_norm"] > 0
    assert any(t["ratio_mean"] != 1.0 or t["ratio_std"] != 0.0 for t in second["timesteps"])


def test_sde_window_trains_only_the_window(tmp_path):
    """Flow-GRPO-Fast style: SDE on k consecutive steps (ODE elsewhere); only those are stored and trained."""
    cfg = tiny("sd3", tmp_path, "sample.sde_window_size=2", "sample.sde_window_range=[0,3]", "run.save_every=0",
               "sample.sde_window_per=step",
               steps=1)
    trainer = Trainer(cfg)
    rec = trainer.step()
    idx = [t["index"] for t in rec["updates"][0]["timesteps"]]
    assert len(idx) == 2 and idx[1] == idx[0] + 1 and idx[0] in (0, 1)
    assert trainer.last_batches[0].latents.shape[1] == 3


@pytest.mark.parametrize("use_lora", [True, False])
def test_kl_to_reference(use_lora, tmp_path):
    """KL to the reference (LoRA disabled, or a frozen copy for full fine-tuning): exactly 0 while the policy is
    the reference (first update), > 0 once it has moved."""
    cfg = tiny("sd3", tmp_path, f"model.use_lora={str(use_lora).lower()}", "train.beta_kl=0.1",
               "train.updates_per_step=2", "train.learning_rate=0.01", "run.save_every=0", steps=1)
    t = Trainer(cfg)
    assert all(("lora" in n) == use_lora for n in t.named_params)
    if not use_lora:
        assert len(t.params) == len(list(t.adapter.transformer.parameters()))
    first, second = t.step()["updates"]
    assert all(ts["kl"] == 0.0 for ts in first["timesteps"])
    assert all(ts["kl"] > 0.0 for ts in second["timesteps"])


def test_evaluate_with_ema_and_cli(tmp_path):
    """``grpo-guard train`` end to end with EMA and evaluation every step; evaluation is deterministic and uses
    the EMA weights (which differ from the trained ones)."""
    from grpo_guard.cli import main as cli_main
    from _trainer import CONFIGS

    rc = cli_main(["train", str(CONFIGS / "tiny_sd3.yaml"), "--output-dir", str(tmp_path), "--set", "run.num_steps=2",
                   "--set", "run.progress=false", "--set", "run.eval_every=1", "--set", "train.ema=true",
                   "--set", "train.learning_rate=0.05", "--set", "train.ema_decay=0.5"])
    assert rc == 0
    recs = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert all({"eval/brightness_mean", "eval/gold/jpeg_compressibility_mean", "eval/proxy_mean"} <= set(r)
               for r in recs)
    t = Trainer(tiny("sd3", tmp_path, "train.ema=true", steps=2))
    assert t.resume() and t.global_step == 2
    a, b = t.evaluate(), t.evaluate()
    assert a == b
    raw = t.evaluate(use_ema=False)
    assert raw != a and all(torch.isfinite(torch.tensor(v)) for v in raw.values())


def test_same_initial_noise_per_group(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "sample.same_noise_per_group=true", "sample.group_size=2", "run.save_every=0",
                     steps=1))
    t.step()
    lat = torch.cat([b.latents for b in t.last_batches])
    x0, groups = lat[:, 0], torch.cat([b.group_ids for b in t.last_batches]).tolist()  # x_0: the initial noise
    for i in range(len(groups)):
        for j in range(len(groups)):
            assert torch.equal(x0[i], x0[j]) == (groups[i] == groups[j])
    # the SDE noise stays per sample: after the first step, members of a group differ
    pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups)) if groups[i] == groups[j]]
    assert pairs and all(not torch.equal(lat[i, 1], lat[j, 1]) for i, j in pairs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_export_lora_loads_in_diffusers(family, tmp_path):
    """The exported LoRA, loaded into a fresh pipeline with ``load_lora_weights``, gives the trained velocity."""
    from grpo_guard.models import build_adapter

    t = Trainer(tiny(family, tmp_path / "run", "train.learning_rate=0.05", "run.save_every=0", steps=2))
    t.train()
    t.export_lora(str(tmp_path / "lora"))
    fresh = build_adapter(t.cfg.model, seed=t.cfg.run.seed)
    x = torch.randn(2, *fresh.latent_shape())
    cond = fresh.encode_prompts(["a red cat", "digit 7"])
    before = fresh.velocity(fresh.transformer, x, 0.8, cond, 3.0)
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    got = fresh.velocity(fresh.transformer, x, 0.8, cond, 3.0)
    want = t.adapter.velocity(t.adapter.transformer, x, 0.8, cond, 3.0)
    assert not torch.allclose(before, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompt_files(suffix, tmp_path):
    """Prompts from a .txt (one per line) or .jsonl file; .jsonl fields other than "prompt" reach the rewards as
    metadata."""
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("a red cat\n\na blue dog\n")
    else:
        path.write_text('{"prompt": "a red cat", "tag": 1}\n{"prompt": "a blue dog", "tag": 2}\n')
    seen = []

    def spy(images, prompts, metadata):
        seen.extend(zip(prompts, metadata))
        return images.mean(dim=(1, 2, 3))

    cfg = tiny("sd3", tmp_path / "run", "data.prompts=[]", f"data.prompt_file={path}", "run.save_every=0", steps=1)
    t = Trainer(cfg, proxy_rewards=[Reward("spy", spy)], gold_rewards=[])
    t.step()
    assert t.prompts == ["a red cat", "a blue dog"]
    want = {"a red cat": {"tag": 1}, "a blue dog": {"tag": 2}} if suffix == ".jsonl" else \
        {"a red cat": {}, "a blue dog": {}}
    assert len(seen) == 8 and all(m == want[p] for p, m in seen)


def counted(forward, calls):
    def wrapper(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("family,use_lora", [("sd3", True), ("flux", True), ("sd3", False)])
def test_gradient_checkpointing_changes_memory_not_results(family, use_lora, tmp_path):
    """train.gradient_checkpointing recomputes the blocks in the backward: the blocks really are checkpointed
    (the recomputation runs), and two steps give the weights and metrics of a run without it."""
    runs = []
    for ckpt in (False, True):
        cfg = tiny(family, tmp_path / str(ckpt), f"train.gradient_checkpointing={str(ckpt).lower()}",
                   f"model.use_lora={str(use_lora).lower()}", "run.save_every=0")
        trainer = Trainer(cfg)
        assert trainer.adapter.transformer.gradient_checkpointing is ckpt
        forwards, block = [], trainer.adapter.transformer.transformer_blocks[0]
        block.forward = counted(block.forward, forwards)  # (a forward hook does not fire in the recomputation)
        recs = [trainer.step(), trainer.step()]
        runs.append(({n: p.detach().clone() for n, p in trainer.named_params.items()}, recs, forwards))
    (w0, r0, f0), (w1, r1, f1) = runs
    assert sum(f1) == 2 * sum(f0) > 0 and len(f1) - sum(f1) == len(f0) - sum(f0)  # each update forward once more
    # (in the backward's recomputation); the rollout's no-grad forwards are unchanged
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], atol=1e-6, rtol=1e-5)
    for a, b in zip(r0, r1):
        for ta, tb in zip(a["updates"][0]["timesteps"], b["updates"][0]["timesteps"]):
            assert ta["ratio_mean"] == tb["ratio_mean"]
            assert abs(ta["loss"] - tb["loss"]) <= 1e-6 * max(1.0, abs(ta["loss"]))


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_bf16_weights_with_float32_latents_without_autocast(family, tmp_path):
    """model.dtype bfloat16, model.latent_dtype float32, no autocast: the adapters cast the latents to the input
    projection's dtype as the pipelines do (without the cast the first layer refuses float32 input); the first
    update stays on-policy."""
    cfg = tiny(family, tmp_path, "model.dtype=bfloat16", "model.latent_dtype=float32", "run.mixed_precision=no",
               "run.save_every=0", "run.eval_every=0", steps=1)
    t = Trainer(cfg)
    rec = t.step()
    assert t.last_batches[0].latents.dtype == torch.float32
    for ts in rec["updates"][0]["timesteps"]:
        assert ts["ratio_mean"] == 1.0 and ts["ratio_std"] == 0.0
