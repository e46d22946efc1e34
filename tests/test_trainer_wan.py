"""Wan text-to-video in the trainer (issue 12), on the tiny offline Wan pipeline: the adapter reproduces
``WanPipeline`` (schedule, timesteps, CFG, latents, decode; Wan 2.2's two experts), a run goes rollout -> video
rewards -> update -> metrics -> evaluation strip -> checkpoint, two processes match one, LoRA and full fine-tuning
(with gradient checkpointing) train, and bad video configs and rewards fail with the key or the prompt named."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _trainer import CONFIGS, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.models import build_adapter, wan
from grpo_guard.trainer import ConfigError, Reward, RewardError, Trainer, checkpoint
from grpo_guard.trainer import memory, rewards as rw
from grpo_guard.trainer import video_rewards as vr
from grpo_guard.trainer.rollout import _noise, generate, mix_seed

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
D = 4 * 3 * 4 * 4  # latent elements of one tiny video: 4 channels x 3 latent frames x 4 x 4


def euler_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return wan.tiny_pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.mark.parametrize("guidance", [4.5, 1.0])
@pytest.mark.parametrize("expand", [False, True], ids=["wan2.1", "ti2v-per-token-t"])
def test_adapter_matches_pipeline(guidance, expand, tmp_path):
    """Deterministic sampling through the adapter ends where ``pipe(...)`` ends from the same noise (with a
    FlowMatchEuler scheduler: the pipeline then takes the same Euler steps), with and without CFG, and with Wan
    2.2 TI2V's per-token timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = tiny("wan", tmp_path, f"sample.guidance_scale={guidance}")
    pipe = wan.tiny_pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), expand_timesteps=expand)
    adapter = wan.Adapter.from_model_config(pipe, cfg.model)
    prompts = ["a red cat", "digit 7"]
    ours = generate(adapter, adapter.transformer, prompts, cfg, seeds=[0, 1])
    gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, k, 6)) for k in (0, 1)]
    x0 = _noise(gens, adapter.latent_shape(), adapter.device, torch.float32)
    assert x0.shape == (2, 4, 3, 4, 4)
    with torch.no_grad():
        theirs = pipe(prompts, height=32, width=32, num_frames=9, num_inference_steps=cfg.sample.num_steps,
                      guidance_scale=guidance, latents=x0.clone(), output_type="latent",
                      max_sequence_length=cfg.model.max_sequence_length).frames
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, x0)


def test_schedule_is_the_hub_schedulers(tmp_path):
    """With Wan's hub scheduler (UniPC, flow sigmas, flow_shift 3) the adapter steps on its sigma grid and feeds
    the transformer its int64 timesteps; model.flow_shift replaces the shift."""
    from diffusers import UniPCMultistepScheduler

    adapter = build_adapter(tiny("wan", tmp_path).model)
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ref.set_timesteps(10)
    sig = adapter.sigmas(10)
    assert sig == [float(s) for s in ref.sigmas] and sig[-1] == 0.0
    for s, t in zip(sig, ref.timesteps):
        got = adapter.timestep(s, 3, "cpu")
        assert got.dtype == torch.int64 and got.tolist() == [int(t)] * 3
    s5 = build_adapter(tiny("wan", tmp_path, "model.flow_shift=5.0").model).sigmas(10)
    base = torch.linspace(1, 1 / 1000, 11)[:-1].double()
    torch.testing.assert_close(torch.tensor(s5[:-1]).double(), 5 * base / (1 + 4 * base), rtol=3e-6, atol=0)  # float32
    with pytest.raises(KeyError, match="not on a grid"):
        adapter.timestep(0.123, 1, "cpu")


def test_decode_is_the_pipelines(tmp_path):
    """Frames (B, F, H, W, 3) in [0, 1]: the pipeline's un-normalization, VAE decode and postprocess."""
    adapter = build_adapter(tiny("wan", tmp_path).model)
    pipe = adapter.pipe
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    frames = adapter.decode(x)
    assert frames.shape == (2, 9, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
    c = pipe.vae.config
    z = x / (1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)) + torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = pipe.video_processor.postprocess_video(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(frames, video.permute(0, 1, 3, 4, 2), rtol=1e-5, atol=1e-6)


def test_end_to_end(tmp_path):
    """Two steps with an evaluation each: LoRA on attention and FFN moved, video rewards logged (proxy and gold,
    per_frame under its label), per-timestep statistics, storage as stated, strips and GIFs written, checkpoint."""
    cfg = tiny("wan", tmp_path, "run.eval_every=1", "run.save_every=0", "run.eval_media=2")
    trainer = Trainer(cfg)
    init = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    assert any(".ffn.net.0.proj.lora_A" in n for n in init) and any(".attn2.to_q.lora_A" in n for n in init)
    last = trainer.train()
    assert any("lora_B" in n for n, p in trainer.named_params.items() if not torch.equal(p, init[n]))
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        for key in ("reward/temporal_consistency_mean", "reward/gold/motion_mean", "reward/gold/mean_brightness_mean",
                    "eval/temporal_consistency_mean", "eval/gold/motion_mean"):
            assert torch.isfinite(torch.tensor(r[key])), key
        assert r["reward/temporal_consistency_mean"] == -r["reward/gold/motion_mean"]
        ts = r["updates"][0]["timesteps"]
        assert [t["index"] for t in ts] == [0, 1, 2]
        for t in ts:
            assert {"ratio_mean", "ratio_std", "clipfrac", "approx_kl", "kl", "grad_norm"} <= set(t)
    # storage per video: x_j and v_old per trained step (3), plus the final latent: float32
    assert last["stored_mib"] * 2 ** 20 == 8 * ((3 + 1) * D * 4 + 3 * D * 4) == 8 * memory.trajectory_bytes(D, 3, 4, 4)
    from PIL import Image
    for step in (1, 2):
        png = Image.open(tmp_path / "eval" / f"step-{step:08d}.png")
        assert png.size == (8 * 32, 2 * 32)  # 8 of the 9 frames per row, 2 samples
        gif = Image.open(tmp_path / "eval" / f"step-{step:08d}.gif")
        assert gif.n_frames == 9 and gif.size == (2 * 32, 32)
        assert (tmp_path / "eval" / f"step-{step:08d}.txt").read_text().splitlines() == list(cfg.data.prompts[:2])
    assert checkpoint.latest(trainer.checkpoint_dir).endswith("step-00000002")
    # (the on-policy ratio in float32 and bf16: test_trainer_e2e.py; bit-exact resume: test_trainer_resume.py)


def counted(forward, calls):
    def wrapper(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("use_lora", [True, False])
def test_gradient_checkpointing_and_full_fine_tuning(use_lora, tmp_path):
    """LoRA and full fine-tuning both train; Wan's blocks are recomputed in the backward under
    train.gradient_checkpointing, with the weights and metrics of a run without it."""
    runs = []
    for ckpt in (False, True):
        cfg = tiny("wan", tmp_path / str(ckpt), f"train.gradient_checkpointing={str(ckpt).lower()}",
                   f"model.use_lora={str(use_lora).lower()}", "run.save_every=0", "run.eval_every=0")
        trainer = Trainer(cfg)
        n_params = sum(p.numel() for p in trainer.adapter.transformer.parameters())
        trained = sum(p.numel() for p in trainer.params)
        assert (trained < n_params / 2) if use_lora else (trained == n_params)
        init = {n: p.detach().clone() for n, p in trainer.named_params.items()}
        forwards, block = [], trainer.adapter.transformer.blocks[0]
        block.forward = counted(block.forward, forwards)
        recs = [trainer.step(), trainer.step()]
        moved = [n for n, p in trainer.named_params.items() if not torch.equal(p, init[n])]
        assert moved and (use_lora or any("blocks.1.ffn" in n for n in moved))
        runs.append(({n: p.detach().clone() for n, p in trainer.named_params.items()}, recs, forwards))
    (w0, r0, f0), (w1, r1, f1) = runs
    assert sum(f1) == 2 * sum(f0) > 0 and len(f1) - sum(f1) == len(f0) - sum(f0)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], atol=1e-6, rtol=1e-5)
    for a, b in zip(r0, r1):
        for ta, tb in zip(a["updates"][0]["timesteps"], b["updates"][0]["timesteps"]):
            assert ta["ratio_mean"] == tb["ratio_mean"]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_trainer_dist_worker.py"), str(tmp_path / "dist"), "2", str(CONFIGS / "tiny_wan.yaml"),
           "sample.batch_size=2", "sample.num_batches=2", "run.eval_every=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "dist" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for n, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][n]), n
    single = Trainer(tiny("wan", tmp_path / "single", "sample.batch_size=2", "sample.num_batches=4",
                          "run.save_every=0", "run.eval_every=0"))
    single.step()
    adv = torch.cat([b.advantages for b in single.last_batches])
    h = [r["history"][0] for r in ranks]
    assert torch.equal(torch.cat([h[0]["advantages"], h[1]["advantages"]]), adv)  # bit-identical first rollout
    single.step()
    for n, p in single.named_params.items():
        torch.testing.assert_close(ranks[0]["weights"][n], p.detach(), atol=1e-6, rtol=1e-4)


def test_export_lora_loads_in_diffusers(tmp_path):
    """The exported LoRA, loaded into a fresh WanPipeline with ``load_lora_weights``, gives the trained velocity."""
    t = Trainer(tiny("wan", tmp_path / "run", "train.learning_rate=0.05", "run.save_every=0", "run.eval_every=0"))
    t.train()
    t.export_lora(str(tmp_path / "lora"))
    fresh = build_adapter(t.cfg.model, seed=t.cfg.run.seed)
    x = torch.randn(2, *fresh.latent_shape())
    cond = fresh.encode_prompts(["a red cat", "digit 7"])
    sigma = fresh.sigmas(4)[1]
    t.adapter.sigmas(4)
    before = fresh.velocity(fresh.transformer, x, sigma, cond, 3.0)
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    got = fresh.velocity(fresh.transformer, x, sigma, cond, 3.0)
    want = t.adapter.velocity(t.adapter.transformer, x, sigma, cond, 3.0)
    assert not torch.allclose(before, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- video rewards ----------------------------------------------------------------------------------------------
def videos(B=3, F=5, seed=0):
    return torch.rand(B, F, 8, 8, 3, generator=torch.Generator().manual_seed(seed))


def test_temporal_consistency_and_motion():
    v = videos()
    still = v[:, :1].expand_as(v).clone()
    assert torch.equal(vr.temporal_consistency(still, [""] * 3, [{}] * 3), torch.zeros(3))
    c = vr.temporal_consistency(v, [""] * 3, [{}] * 3)
    assert (c < 0).all() and torch.equal(vr.motion(v, [""] * 3, [{}] * 3), -c)
    # an independent computation: mean over the 4 frame pairs of the mean absolute difference
    want = torch.stack([sum((v[b, t + 1] - v[b, t]).abs().mean() for t in range(4)) / 4 for b in range(3)])
    torch.testing.assert_close(-c, want)
    with pytest.raises(ValueError, match=r"scores videos \(B, F, H, W, 3\)"):
        vr.motion(torch.rand(3, 3, 8, 8), [""] * 3, [{}] * 3)


@pytest.mark.parametrize("reduction", ["mean", "min", "max"])
def test_per_frame_reduces_an_image_reward_over_frames(reduction):
    v = videos()
    seen = []

    def redness(images, prompts, metadata):  # an image reward: (N, 3, H, W) -> (N,)
        seen.append((images.shape, list(prompts)))
        return images[:, 0].mean((1, 2))
    r = vr.per_frame(redness, reduction=reduction, stride=2)
    out = r(v, ["a", "b", "c"], [{}] * 3)
    per = v[:, [0, 2, 4], :, :, 0].mean((2, 3))  # frames 0, 2, 4
    want = {"mean": per.mean(1), "min": per.min(1).values, "max": per.max(1).values}[reduction]
    torch.testing.assert_close(out, want)
    assert seen == [((9, 3, 8, 8), ["a"] * 3 + ["b"] * 3 + ["c"] * 3)]
    # at most `frames` of them, evenly spaced with first and last; calls of at most batch_frames images
    seen.clear()
    vr.per_frame(redness, frames=2, batch_frames=4)(v, ["a", "b", "c"], [{}] * 3)
    assert vr.frame_indices(5, 1, 2) == [0, 4] and [s[0][0] for s in seen] == [4, 2]


def test_per_frame_of_a_builtin_by_name_and_refusals():
    r = rw.resolve("per_frame", {"reward": "brightness"})
    v = videos()
    torch.testing.assert_close(r(v, ["x"] * 3, [{}] * 3), v.mean((1, 2, 3, 4)))
    assert rw.modality_of(r) == "video"
    with pytest.raises(ValueError, match="reduction must be one of"):
        vr.per_frame("brightness", reduction="median")
    with pytest.raises(ValueError, match="wraps an image reward"):
        vr.per_frame("motion")


# --- errors --------------------------------------------------------------------------------------------------------
def test_image_reward_on_a_video_model_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A built-in by name: by the config check; an injected reward that declares its modality: by the Trainer,
    before the model loads."""
    import grpo_guard.trainer.loop as loop

    with pytest.raises(ConfigError, match=r"rewards\.gold\[0\] 'brightness' scores images.*per_frame"):
        tiny("wan", tmp_path, "rewards.gold=[{name: brightness}]")
    with pytest.raises(ConfigError, match=r"rewards\.proxy\[0\] 'motion' scores videos but the model makes images"):
        tiny("sd3", tmp_path, "rewards.proxy=[{name: motion}]")
    monkeypatch.setattr(loop, "build_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RewardError, match=r"rewards\.gold\[0\] 'b' scores images.*per_frame"):
        Trainer(tiny("wan", tmp_path), gold_rewards=[Reward("b", rw.brightness)])
    with pytest.raises(RewardError, match=r"rewards\.proxy\[0\] 'm' scores videos"):
        Trainer(tiny("sd3", tmp_path), proxy_rewards=[Reward("m", vr.motion)])


@pytest.mark.parametrize("override,match", [
    ("model.num_frames=10", r"model\.num_frames=10: Wan's VAE needs 4k \+ 1"),
    ("model.height=40", r"model\.height=40: .*multiple of 16"),
    ("model.width=0", r"model\.width must be > 0"),
])
def test_bad_video_config(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        tiny("wan", tmp_path, override)


def test_video_keys_on_an_image_model(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_frames is a video key .*'sd3' makes images"):
        tiny("sd3", tmp_path, "model.num_frames=9")


def two_expert_adapter(cfg, expert, scheduler=None):
    """A tiny Wan 2.2 A14B-like pipeline: at 4 steps on the UniPC grid the timesteps are 999, 900, 750, 500, so with
    boundary_ratio 0.8 the high-noise expert samples steps 0-1 and the low-noise one steps 2-3."""
    pipe = wan.tiny_pipeline(boundary_ratio=0.8, scheduler=scheduler)
    cfg.model.expert = expert
    return wan.Adapter.from_model_config(pipe, cfg.model)


@pytest.mark.parametrize("expert,window", [("high", "[0,2]"), ("low", "[2,3]")])
def test_wan22_trains_one_expert(expert, window, tmp_path):
    """Wan 2.2 A14B: the trained expert is model.expert's; the frozen one samples its steps and never changes; the
    trained steps lie in the trained expert's range; the first update is on-policy."""
    cfg = tiny("wan", tmp_path, "sample.sde_window_size=1", f"sample.sde_window_range={window}",
               "sample.guidance_scale_2=2.0", "run.save_every=0", "run.eval_every=1")
    adapter = two_expert_adapter(cfg, expert)
    trained, frozen = adapter.transformer, adapter.frozen_expert
    assert trained is (adapter.pipe.transformer if expert == "high" else adapter.pipe.transformer_2)
    frozen_before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    calls = {"trained": 0, "frozen": 0}
    for name, m in (("trained", trained), ("frozen", frozen)):
        m.register_forward_pre_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    t = Trainer(cfg, adapter=adapter)
    assert t.named_params and all(p is q for p, q in zip(t.params, [p for p in trained.parameters()
                                                                     if p.requires_grad]))
    init = {n: p.detach().clone() for n, p in t.named_params.items()}
    rec = t.step()
    steps = [ts["index"] for ts in rec["updates"][0]["timesteps"]]
    lo, hi = (0, 2) if expert == "high" else (2, 3)
    assert len(steps) == 1 and lo <= steps[0] < hi
    assert rec["updates"][0]["timesteps"][0]["ratio_mean"] == 1.0
    assert any(not torch.equal(p, init[n]) for n, p in t.named_params.items())
    assert all(torch.equal(p, frozen_before[n]) for n, p in frozen.named_parameters())
    assert calls["trained"] > 0 and calls["frozen"] > 0  # each expert sampled its own steps
    assert all(not p.requires_grad for p in frozen.parameters())


def test_wan22_matches_the_pipeline(tmp_path):
    """Sampling through a two-expert adapter (expert switch at the boundary, guidance_scale_2 on the low-noise
    steps) ends where WanPipeline ends."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = tiny("wan", tmp_path, "sample.guidance_scale_2=2.0", "sample.sde_window_size=1",
               "sample.sde_window_range=[0,2]")
    adapter = two_expert_adapter(cfg, "high", FlowMatchEulerDiscreteScheduler(shift=3.0))
    adapter.configure(cfg.sample)
    assert [adapter.expert_at(s) for s in adapter.sigmas(4)[:-1]] == ["high", "high", "low", "low"]
    ours = generate(adapter, adapter.transformer, ["a red cat", "digit 7"], cfg, seeds=[0, 1])
    gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, k, 6)) for k in (0, 1)]
    x0 = _noise(gens, adapter.latent_shape(), adapter.device, torch.float32)
    with torch.no_grad():
        theirs = adapter.pipe(["a red cat", "digit 7"], height=32, width=32, num_frames=9, num_inference_steps=4,
                              guidance_scale=4.5, guidance_scale_2=2.0, latents=x0.clone(), output_type="latent",
                              max_sequence_length=cfg.model.max_sequence_length).frames
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    adapter.guidance_scale_2 = None  # the check can fail: the low-noise steps' guidance matters
    assert not torch.allclose(generate(adapter, adapter.transformer, ["a red cat", "digit 7"], cfg, seeds=[0, 1]),
                              theirs, rtol=1e-5, atol=1e-6)


def test_wan22_trains_both_experts(tmp_path):
    """model.expert both (the tiny config builds a two-expert pipeline): one module, one optimizer over both LoRA
    sets; steps 0-1 train the high-noise expert, step 2 the low-noise one; on-policy; export one LoRA per expert."""
    cfg = tiny("wan", tmp_path / "run", "model.expert=both", "run.save_every=0", "run.eval_every=0",
               "train.learning_rate=0.05")
    t = Trainer(cfg)
    assert isinstance(t.adapter.transformer, wan.Experts) and t.adapter.frozen_expert is None
    assert {n.split(".")[0] for n in t.named_params} == {"high", "low"}
    init = {n: p.detach().clone() for n, p in t.named_params.items()}
    rec = t.step()
    assert [ts["index"] for ts in rec["updates"][0]["timesteps"]] == [0, 1, 2]
    assert all(ts["ratio_mean"] == 1.0 for ts in rec["updates"][0]["timesteps"])
    moved = {n.split(".")[0] for n, p in t.named_params.items() if not torch.equal(p, init[n])}
    assert moved == {"high", "low"}
    # export: <dir>/high into transformer, <dir>/low into transformer_2 give the trained velocities
    t.export_lora(str(tmp_path / "lora"))
    fresh = build_adapter(cfg.model, seed=cfg.run.seed)
    fresh.pipe.load_lora_weights(str(tmp_path / "lora" / "high"))
    fresh.pipe.load_lora_weights(str(tmp_path / "lora" / "low"), load_into_transformer_2=True)
    x = torch.randn(2, *fresh.latent_shape())
    cond = fresh.encode_prompts(["a red cat", "digit 7"])
    sig = fresh.sigmas(4)
    t.adapter.sigmas(4)
    for s in (sig[0], sig[2]):  # one high-noise, one low-noise step
        assert fresh.expert_at(s) == ("high" if s == sig[0] else "low")
        want = t.adapter.velocity(t.adapter.transformer, x, s, cond, 3.0)
        torch.testing.assert_close(fresh.velocity(fresh.transformer, x, s, cond, 3.0), want, rtol=1e-5, atol=1e-6)


def test_wan22_both_experts_under_sharding_need_aligned_windows(tmp_path):
    """With per-micro-batch SDE windows across the boundary, two processes could run different experts at the same
    time (a deadlock under FSDP2 / DeepSpeed): experts_vary says so; shared or one-sided windows are fine."""
    def vary(*sets):
        cfg = tiny("wan", tmp_path, "model.expert=both", "sample.sde_window_size=1", *sets)
        adapter = build_adapter(cfg.model)
        return adapter.experts_vary(cfg.sample)
    assert vary("sample.sde_window_range=[0,3]")
    assert not vary("sample.sde_window_range=[0,3]", "sample.sde_window_per=step")
    assert not vary("sample.sde_window_range=[0,2]") and not vary("sample.sde_window_range=[2,3]")
    cfg = tiny("wan", tmp_path, "model.expert=both", "sample.sde_window_size=1", "sample.sde_window_range=[0,3]")
    adapter = build_adapter(cfg.model)
    adapter.configure(cfg.sample)  # DDP-style: fine
    with pytest.raises(ValueError, match=r"model\.expert: both with sample\.sde_window_per: micro_batch .*FSDP2"):
        adapter.configure(cfg.sample, lockstep=True)


def test_wan22_expert_config_errors(tmp_path):
    # before any weights load: from model_index.json
    index = {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    with pytest.raises(ValueError, match=r"has two experts .*set model\.expert"):
        wan.check_experts(index, None, "model.pretrained='Wan-AI/Wan2.2-T2V-A14B-Diffusers'")
    wan.check_experts(index, "low", "x")
    wan.check_experts({"transformer_2": [None, None], "boundary_ratio": None}, None, "x")  # Wan 2.1 / TI2V-5B
    with pytest.raises(ValueError, match=r"model\.expert='high' is for two-expert pipelines"):
        wan.check_experts({"transformer_2": [None, None]}, "high", "x")
    with pytest.raises(ConfigError, match=r"model\.expert is a video key"):
        tiny("sd3", tmp_path, "model.expert=high")
    with pytest.raises(ConfigError, match=r"model\.expert must be high, low, both or null"):
        tiny("wan", tmp_path, "model.expert=middle")
    with pytest.raises(ConfigError, match=r"sample\.guidance_scale_2 is the low-noise expert's"):
        tiny("sd3", tmp_path, "sample.guidance_scale_2=3")
    # trained steps on the frozen expert's side, named with the key
    cfg = tiny("wan", tmp_path)  # timestep_fraction 0.99: steps 0-2 cross the boundary
    with pytest.raises(ConfigError, match=r"sample\.timestep_fraction 0\.99 \(steps 0-2\) includes step\(s\) \[2\] "
                                          r"of the low-noise expert.*samples steps 0-1 of 4"):
        Trainer(cfg, adapter=two_expert_adapter(cfg, "high"))
    cfg = tiny("wan", tmp_path, "sample.sde_window_size=1", "sample.sde_window_range=[1,3]")
    with pytest.raises(ConfigError, match=r"sample\.sde_window_range \[1, 3\] includes step\(s\) \[1\] of the "
                                          r"high-noise expert"):
        Trainer(cfg, adapter=two_expert_adapter(cfg, "low"))


def test_shape_the_loaded_vae_cannot_take(tmp_path, monkeypatch):
    """The adapter checks the frame size against the loaded VAE and patch size (Wan 2.2's VAE: factor 16, x patch
    2 = 32), and the trainer reports it as a ConfigError naming the key."""
    real = wan.tiny_pipeline

    def factor16(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.vae_scale_factor_spatial = 16
        return pipe
    monkeypatch.setattr(wan, "tiny_pipeline", factor16)
    with pytest.raises(ConfigError, match=r"model\.height=48: must be a positive multiple of 32"):
        Trainer(tiny("wan", tmp_path, "model.height=48", "model.width=64"))
    with pytest.raises(ValueError, match=r"model\.num_frames=7: this VAE needs num_frames = 4k \+ 1"):
        wan.Adapter(real(), height=32, width=32, num_frames=7)


def test_failing_video_reward_names_the_prompt(tmp_path):
    def broken(videos, prompts, metadata):
        raise RuntimeError("decoder out of memory")

    def per_frame_values(videos, prompts, metadata):  # forgot to reduce over frames
        return videos.mean((2, 3, 4))
    cfg = tiny("wan", tmp_path, "run.eval_every=0")
    with pytest.raises(RewardError, match=r"reward 'broken' raised RuntimeError: decoder out of memory.*a blue dog"):
        Trainer(cfg, proxy_rewards=[Reward("broken", broken)]).step()
    with pytest.raises(RewardError, match=r"returned 36 values for a batch of 4 .*9 per video, one per frame"):
        Trainer(cfg, proxy_rewards=[Reward("frames", per_frame_values)]).step()


def test_latent_rewards_skip_the_decode(tmp_path, monkeypatch):
    """A reward declared with input="latents" gets the final latents (B, C, F', h, w); when no reward reads pixels
    the VAE never decodes."""
    seen = []

    def energy(latents, prompts, metadata):
        seen.append(latents.shape)
        return latents.float().square().mean((1, 2, 3, 4))
    rw.declare(energy, "video", input="latents")
    trainer = Trainer(tiny("wan", tmp_path, "run.eval_every=0", "run.save_every=0"),
                      proxy_rewards=[Reward("energy", energy)], gold_rewards=[])
    monkeypatch.setattr(trainer.adapter, "decode", lambda x: pytest.fail("decoded"))
    rec = trainer.step()
    assert seen and all(s == (4, 4, 3, 4, 4) for s in seen) and rec["reward/energy_mean"] > 0


# --- memory, LoRA targets, image strips ----------------------------------------------------------------------------
def test_memory_table_is_the_readmes_and_the_trainers_count():
    text = (CONFIGS / "README.md").read_text()
    inside = text.split("<!-- memory-table -->\n", 1)[1].split("\n<!-- /memory-table -->", 1)[0]
    assert inside == memory.table()
    # K + 1 latents and K velocities (test_end_to_end checks the trainer's count against this function)
    assert memory.trajectory_bytes(D, 3, 4, 2) == (3 + 1) * D * 4 + 3 * D * 2


@pytest.mark.parametrize("targets", ["default", "recipe"])
def test_lora_targets_exist_in_wan_blocks(targets):
    """Every LoRA target names modules of every block of the real class (the tiny model has the same names)."""
    from grpo_guard.trainer import load

    names = wan.LORA_TARGETS if targets == "default" else \
        load(str(CONFIGS / "wan21_t2v_1.3b_guard.yaml")).model.lora.target_modules
    modules = [n for n, _ in wan.tiny_transformer().named_modules()]
    for t in names:
        hits = [n for n in modules if n.endswith("." + t)]
        assert len(hits) == 2, (t, hits)  # one per block of the 2-block model


def test_image_models_write_a_strip_too(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=0", "run.eval_media=3", steps=1))
    t.evaluate(prompts=["a red cat", "digit 7", "a blue dog", "digit 1"])
    from PIL import Image
    png = Image.open(tmp_path / "eval" / "step-00000000.png")
    assert png.size == (16, 3 * 16) and not (tmp_path / "eval" / "step-00000000.gif").exists()


def test_sde_window(tmp_path):
    """Flow-GRPO-Fast style on video: SDE on 2 consecutive steps, only those stored and trained."""
    trainer = Trainer(tiny("wan", tmp_path, "sample.sde_window_size=2", "sample.sde_window_per=step",
                           "run.save_every=0", "run.eval_every=0", steps=1))
    rec = trainer.step()
    idx = [t["index"] for t in rec["updates"][0]["timesteps"]]
    assert len(idx) == 2 and idx[1] == idx[0] + 1 and idx[0] in (0, 1)
    assert trainer.last_batches[0].latents.shape[1:3] == (3, 4)  # 2 trained steps + the next latent, 4 channels
    assert rec["updates"][0]["timesteps"][0]["ratio_mean"] == 1.0


def test_bf16_tiny_model_has_from_pretrained_dtypes(tmp_path):
    """model.dtype bfloat16 on the tiny pipeline casts the transformer as from_pretrained(torch_dtype=bf16) loads
    Wan: every parameter gets the same dtype (rope, time embedder, norm1-3, modulation tables stay float32)."""
    from diffusers import WanTransformer3DModel

    wan.tiny_transformer().save_pretrained(tmp_path / "t")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    ours = wan.tiny_pipeline(dtype=torch.bfloat16).transformer
    want = {n: p.dtype for n, p in loaded.named_parameters()}
    assert {n: p.dtype for n, p in ours.named_parameters()} == want
    assert torch.float32 in want.values() and torch.bfloat16 in want.values()


def test_transformer_inputs_are_the_hub_pipelines(tmp_path):
    """With Wan's hub scheduler (UniPC) the pipeline takes multistep updates we do not, so the end points differ;
    what the transformer is given at each step must not: the same int64 timesteps, latents dtype, and prompt
    embeddings (cond first, then uncond) as WanPipeline's first step from the same noise."""
    cfg = tiny("wan", tmp_path)
    adapter = build_adapter(cfg.model)
    seen = []
    hook = adapter.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append({k: kwargs[k].clone() for k in ("timestep", "encoder_hidden_states")} |
                                            {"x": kwargs["hidden_states"].clone()}), with_kwargs=True)
    x0 = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapter.pipe(["a red cat"], height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=4.5,
                     latents=x0.clone(), output_type="latent", max_sequence_length=16)
        theirs, seen[:] = list(seen), []
        sig = adapter.sigmas(4)
        cond = adapter.encode_prompts(["a red cat"])
        adapter.velocity(adapter.transformer, x0, sig[0], cond, 4.5)
    hook.remove()
    assert len(theirs) == 8 and len(seen) == 2  # 4 steps x (cond, uncond); our first step
    for ours, pipe_call in zip(seen, theirs[:2]):
        for k in ("timestep", "encoder_hidden_states", "x"):
            assert ours[k].dtype == pipe_call[k].dtype and torch.equal(ours[k], pipe_call[k]), k
    assert [c["timestep"].tolist() for c in theirs[::2]] == [[adapter.timestep(s, 1, "cpu").item()] for s in sig[:-1]]
