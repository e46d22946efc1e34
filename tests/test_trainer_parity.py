"""Behaviours that follow the published flow_grpo / GRPO-Guard trainers (configs/README.md, "Differences from
flow_grpo"): the zero-advantage filter, the SDE-window rule, group size 1, the EMA schedule and the exported EMA,
the jpeg reward's scale, the prompt length, and the rollout's storage in the compute dtype."""
import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import ConfigError, Reward, Trainer, config
from grpo_guard.trainer import rewards as rw
from grpo_guard.trainer.rollout import window_start
from grpo_guard.trainer.update import EMA

pytestmark = pytest.mark.usefixtures("one_thread")


def _tied_reward(tied_prompt):
    """Brightness, except that every image of ``tied_prompt`` gets the same reward (its group's advantages are
    exactly 0)."""
    def fn(images, prompts, metadata):
        r = rw.brightness(images, prompts, metadata)
        return torch.where(torch.tensor([p == tied_prompt for p in prompts]), torch.full_like(r, 0.5), r)
    return Reward("tied", fn)


def _trainer(tmp_path, *overrides, proxy=None):
    cfg = tiny("sd3", tmp_path, "run.save_every=0", *overrides, steps=1)
    return Trainer(cfg, proxy_rewards=proxy)


@pytest.mark.parametrize("drop", [True, False])
def test_zero_advantage_samples_are_not_trained(drop, tmp_path):
    t = _trainer(tmp_path, f"train.drop_zero_advantages={str(drop).lower()}", "sample.group_size=2",
                 "train.updates_per_step=2", proxy=[_tied_reward("a red cat")])
    batches = t.rollout()
    t.advantages(batches)
    adv = {int(i): float(a) for b in batches for i, a in zip(b.sample_ids, b.advantages)}
    zero = {i for i, a in adv.items() if a == 0.0}
    assert zero, "the tied prompt's group has advantage 0"
    trained = t.select(batches)
    per = len(batches) // 2
    for u in range(2):  # each optimizer step's weights sum to 1 (the mean over its kept samples)
        assert sum(b.loss_weight for b in trained[u * per:(u + 1) * per]) == pytest.approx(1.0)
    ids = {int(i) for b in trained if b.loss_weight for i in b.sample_ids}
    if drop:
        assert ids == set(adv) - zero
        for b in trained:  # a kept micro-batch's weight is its share of the step's kept samples
            assert b.loss_weight == 0 or all(a != 0 for a in b.advantages.tolist())
    else:
        assert ids == set(adv)
    rec = t.step()  # the loop runs with it, and the first update is still exactly on-policy
    assert rec["trained_fraction"] == (pytest.approx(len(ids) / len(adv)) if drop else 1.0)
    assert all(ts["ratio_mean"] == 1.0 and ts["ratio_std"] == 0.0 for ts in rec["updates"][0]["timesteps"])


def test_a_micro_batch_without_nonzero_advantages_keeps_one_sample_at_weight_zero(tmp_path):
    t = _trainer(tmp_path, "sample.group_size=4", proxy=[_tied_reward("a red cat")])
    batches = t.rollout()
    t.advantages(batches)
    for b in batches:
        b.advantages = torch.zeros_like(b.advantages)
    batches[0].advantages[0] = 1.0
    trained = t.select(batches)
    assert [len(b) for b in trained] == [1, 1] and [b.loss_weight for b in trained] == [1.0, 0.0]


def test_group_size_one_normalizes_over_the_batch(tmp_path):
    t = _trainer(tmp_path, "sample.group_size=1", "sample.global_std=false")
    batches = t.rollout()
    got = t.advantages(batches)["advantages"]
    r = torch.cat([b.proxy_reward for b in batches]).float()
    want = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(got, want)
    assert (got != 0).all()


def test_sde_windows_lie_inside_the_range_and_differ_per_micro_batch(tmp_path):
    cfg = tiny("sd3", tmp_path, "sample.num_steps=10", "sample.sde_window_size=3", "sample.sde_window_range=[1,6]")
    starts = [window_start(step, cfg, first) for step in range(40) for first in (0, 4)]
    assert set(starts) == {1, 2, 3}  # [lo, hi - k], both ends reached, every window inside [1, 6)
    assert any(window_start(s, cfg, 0) != window_start(s, cfg, 4) for s in range(40))  # per micro-batch
    per_step = tiny("sd3", tmp_path, "sample.num_steps=10", "sample.sde_window_size=3",
                    "sample.sde_window_range=[1,6]", "sample.sde_window_per=step")
    assert all(window_start(s, per_step, 0) == window_start(s, per_step, 4) for s in range(40))
    with pytest.raises(ConfigError, match=r"hi - lo >= sample\.sde_window_size \(3: the window lies inside"):
        tiny("sd3", tmp_path, "sample.num_steps=10", "sample.sde_window_size=3", "sample.sde_window_range=[1,3]")
    with pytest.raises(ConfigError, match=r"sample\.sde_window_per must be one of"):
        tiny("sd3", tmp_path, "sample.sde_window_per=batch")


def test_micro_batches_with_different_windows_train_together(tmp_path):
    t = _trainer(tmp_path, "sample.sde_window_size=2", "sample.batch_size=2", "sample.num_batches=4",
                 "sample.group_size=4", "run.seed=3")
    rec = t.step()
    windows = [tuple(b.steps) for b in t.last_batches]
    assert all(w in ((0, 1), (1, 2)) for w in windows) and len(set(windows)) == 2
    ts = rec["updates"][0]["timesteps"]
    assert [d["index"] for d in ts] == ["w0", "w1"]
    assert all(d["ratio_mean"] == 1.0 and d["ratio_std"] == 0.0 for d in ts)


def test_ema_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, interval=4)
    want = torch.zeros(3)
    for n in range(20):
        with torch.no_grad():
            p.add_(1.0)
        moved = ema.update([p], n)
        assert moved == ((n + 1) % 4 == 0)
        if moved:
            d = min((1 + n) / (10 + n), 0.9)
            want = d * want + (1 - d) * p.detach()
        torch.testing.assert_close(ema.shadow[0], want)
    assert ema.decay_at(3) == pytest.approx(4 / 13) and ema.decay_at(1000) == 0.9


def test_exported_lora_is_the_ema(tmp_path):
    from safetensors.torch import load_file

    t = Trainer(tiny("sd3", tmp_path / "run", "train.ema=true", "train.ema_update_interval=1",
                     "train.learning_rate=0.05", "run.save_every=0", steps=3))
    t.train()
    shadow = dict(zip(t.named_params, t.ema.shadow))
    assert any(not torch.equal(shadow[n], p.detach()) for n, p in t.named_params.items())
    for use_ema, want in ((None, shadow), (False, {n: p.detach() for n, p in t.named_params.items()})):
        out = tmp_path / f"lora_{use_ema}"
        t.export_lora(str(out), use_ema=use_ema)
        saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
        for n, v in want.items():  # peft names: transformer.<module>.lora_A.weight (no adapter name)
            key = "transformer." + n.replace(".default", "")
            assert torch.equal(saved[key], v.to(saved[key].dtype)), key
    # the trained weights are back after the export
    assert any(not torch.equal(shadow[n], p.detach()) for n, p in t.named_params.items())


def test_jpeg_compressibility_is_flow_grpos_scale():
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kb = rw.jpeg_size_kb(img, ["a", "b"], [{}, {}])
    torch.testing.assert_close(rw.jpeg_compressibility(img, ["a", "b"], [{}, {}]), -kb / 500)
    assert (kb > 0.3).all()


@pytest.mark.parametrize("family,default", [("sd3", 128), ("flux", 512)])
def test_prompt_length_reaches_the_encoder(family, default, tmp_path):
    from grpo_guard.models import build_adapter

    cfg = tiny(family, tmp_path, "model.max_sequence_length=null")
    assert cfg.model.max_sequence_length is None
    assert build_adapter(cfg.model).max_sequence_length == default
    lengths = []
    for n in (16, 20):
        a = build_adapter(tiny(family, tmp_path, f"model.max_sequence_length={n}").model)
        lengths.append(a.encode_prompts(["a red cat"])["prompt_embeds"].shape[1])
    assert lengths[1] - lengths[0] == 4


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_rollout_stores_the_velocity_in_the_compute_dtype(family, precision, tmp_path):
    """bf16 weights, or float32 weights under bf16 autocast (whose outputs accelerate upcasts to float32): the old
    velocity is stored in bf16 either way, and the first update is still exactly on-policy."""
    from accelerate.state import AcceleratorState

    extra = "model.dtype=bfloat16" if precision == "bf16-weights" else "run.mixed_precision=bf16"
    AcceleratorState._reset_state(True)  # a process keeps accelerate's first mixed-precision setting otherwise
    try:
        t = Trainer(tiny(family, tmp_path, extra, "run.save_every=0", steps=1))
        rec = t.step()
    finally:
        AcceleratorState._reset_state(True)
    b = t.last_batches[0]
    lat_bytes = 2 if precision == "bf16-weights" else 4
    assert b.old_velocity.dtype == torch.bfloat16 and b.latents.element_size() == lat_bytes
    n, D = sum(len(x) for x in t.last_batches), b.latents[0, 0].numel()
    K = len(b.steps)
    assert rec["stored_mib"] * 2 ** 20 == n * ((K + 1) * D * lat_bytes + K * D * 2)
    assert all(ts["ratio_mean"] == 1.0 and ts["ratio_std"] == 0.0 for ts in rec["updates"][0]["timesteps"])


def test_shipped_recipes_are_the_published_ones():
    """configs/sd35m_pickscore_guard.yaml = flow_grpo's config/grpo_guard.py pickscore_hps_sd3_ratio_norm;
    configs/sd35m_pickscore_flowgrpo.yaml = config/grpo.py pickscore_sd3 (configs/README.md)."""
    from _trainer import CONFIGS

    guard = config.load(str(CONFIGS / "sd35m_pickscore_guard.yaml"))
    base = config.load(str(CONFIGS / "sd35m_pickscore_flowgrpo.yaml"))
    for cfg, gpus, batches, lr, clip, beta, global_std, method in (
            (guard, 16, 8, 1e-4, 4e-6, 0.0, False, "guard"), (base, 32, 4, 3e-4, 1e-4, 0.01, True, "grpo")):
        s, t = cfg.sample, cfg.train
        assert (t.method, t.learning_rate, t.clip_range, t.beta_kl, s.global_std) == (method, lr, clip, beta, global_std)
        assert (s.num_steps, s.guidance_scale, s.noise_level, s.group_size, s.batch_size, s.num_batches) == \
            (10, 4.5, 0.7, 24, 9, batches)
        assert s.batch_size * s.num_batches * gpus == 1152 and t.updates_per_step == 2
        assert (cfg.model.resolution, cfg.model.max_sequence_length, cfg.model.lora.rank, cfg.model.lora.alpha) == \
            (512, 128, 32, 64)
        assert t.ema and t.ema_decay == 0.9 and t.ema_update_interval == 8 and t.drop_zero_advantages
        m = cfg.model
        assert (m.dtype, m.latent_dtype, m.vae_dtype, m.text_encoder_dtype, cfg.run.mixed_precision) == \
            ("float32", "float32", "float32", "float16", "fp16")
        assert (t.adv_clip_max, t.max_grad_norm, t.weight_decay, t.adam_eps) == (5.0, 1.0, 1e-4, 1e-8)
        config.validate(cfg, world_size=gpus)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_grpo_precision_mode(family, tmp_path):
    """flow_grpo's precision: float32 weights under float16 autocast, float32 latents and VAE, float16 text
    encoders (on a CPU the trainer autocasts itself; there is no loss scaler). The velocity is stored in float16,
    the first update is exactly on-policy, the second is not."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        t = Trainer(tiny(family, tmp_path, "run.mixed_precision=fp16", "model.latent_dtype=float32",
                         "model.vae_dtype=float32", "model.text_encoder_dtype=float16", "train.updates_per_step=2",
                         "train.learning_rate=0.05", "run.save_every=0", steps=1))
        rec = t.step()
    finally:
        AcceleratorState._reset_state(True)
    b = t.last_batches[0]
    assert (b.old_velocity.dtype, b.latents.dtype, t.adapter.pipe.vae.dtype) == \
        (torch.float16, torch.float32, torch.float32)
    assert t.adapter.pipe.text_encoder.dtype == torch.float16
    first, second = rec["updates"]
    assert all(d["ratio_mean"] == 1.0 and d["ratio_std"] == 0.0 for d in first["timesteps"])
    assert any(d["ratio_std"] != 0.0 for d in second["timesteps"])
    assert first["skipped"] == 0 and first["overflow"] == 0


def test_precision_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.vae_dtype must be one of"):
        tiny("sd3", tmp_path, "model.vae_dtype=fp32")
    with pytest.raises(ConfigError, match=r"run\.mixed_precision must be one of"):
        tiny("sd3", tmp_path, "run.mixed_precision=fp8")


def test_trainer_runs_flow_dppo_and_logs_its_stats(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "train.method=dppo", "train.updates_per_step=2", "train.learning_rate=0.05",
                     "train.kl_threshold=1.0e-9", "run.save_every=0", steps=1))
    rec = t.step()
    first, second = rec["updates"]
    for d in first["timesteps"]:  # on-policy: K = 0, nothing masked, ratio exactly 1
        assert (d["ratio_mean"], d["ratio_std"], d["kl_max"], d["masked_fraction"]) == (1.0, 0.0, 0.0, 0.0)
    assert all(d["kl_mean"] > 0 for d in second["timesteps"])
    assert any(d["masked_fraction"] > 0 for d in second["timesteps"])  # tau tiny: every move away is masked
    assert all(0 <= d["masked_fraction_pos"] <= 1 and 0 <= d["masked_fraction_neg"] <= 1 for d in second["timesteps"])
    with pytest.raises(ConfigError, match=r"train\.kl_threshold must be"):
        tiny("sd3", tmp_path, "train.method=dppo", "train.kl_threshold=0")
