"""Bad configs, failing rewards and non-finite losses stop (or skip) with clear messages."""
import pytest
import torch

from _trainer import CONFIGS, nan_losses, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import ConfigError, NonFiniteLossError, Reward, RewardError, Trainer, config
from grpo_guard.trainer.cli import main as train_main
from grpo_guard.trainer.rollout import plan_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("override,match", [
    ("train.metod=grpo", r"unknown config key\(s\) train\.metod"),
    ("bogus.x=1", r"unknown config key\(s\) bogus"),
    ("sample.num_steps=4.5", r"sample\.num_steps: expected an integer"),
    ("sample.num_steps=true", r"sample\.num_steps: expected an integer"),
    ("train.clip_range=abc", r"train\.clip_range: expected a number"),
    ("model.use_lora=1", r"model\.use_lora: expected true/false"),
    ("train.method=ppo", r"train\.method must be one of"),
    ("model.tiny=false", r"exactly one of model\.pretrained"),
    ("rewards.proxy=[]", r"rewards\.proxy is empty"),
    ("sample.sde_window_size=4", r"sde_window_range"),
    ("rewards.gold=[{name: brightness}]", r"rewards\.gold\[0\] 'brightness' is already used by rewards\.proxy\[0\]"),
    ("train.cfg=false", r"train\.cfg=false but sample\.guidance_scale=4\.5"),
    ("run.seed=-1", r"run\.seed must be in \[0, 2\*\*32\)"),
    ("run.seed=4294967296", r"run\.seed must be in \[0, 2\*\*32\)"),
])
def test_bad_config_is_an_error(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        tiny("sd3", tmp_path, override)


def test_unquoted_yaml_no_means_no_mixed_precision(tmp_path):
    assert tiny("sd3", tmp_path, "run.mixed_precision=no").run.mixed_precision == "no"  # YAML 1.1: `no` is false
    with pytest.raises(ConfigError, match=r"run\.mixed_precision: expected a string, got bool True"):
        tiny("sd3", tmp_path, "run.mixed_precision=yes")


def test_groups_must_fill_the_step(tmp_path):
    with pytest.raises(ConfigError, match=r"4 \* 2 \* 1 = 8 must be a multiple of sample\.group_size \(3\)"):
        Trainer(tiny("sd3", tmp_path, "sample.group_size=3"))


def test_bad_config_from_the_cli(tmp_path, capsys):
    rc = train_main([str(CONFIGS / "tiny_sd3.yaml"), "--set", "train.lr=1", "--output-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "tiny_sd3.yaml" in err and "train.lr" in err and "learning_rate" in err


def test_defaults_are_the_published_guard_recipe():
    cfg = config.Config()
    assert (cfg.train.method, cfg.train.clip_range, cfg.sample.num_steps, cfg.sample.noise_level) == \
        ("guard", 2e-6, 10, 0.7)
    assert config.trained_steps(cfg.sample) == list(range(9))  # int(10 * 0.99): the last step is never trained


def _trainer(tmp_path, proxy=None, gold=None):
    return Trainer(tiny("sd3", tmp_path, "run.save_every=0", steps=1), proxy_rewards=proxy, gold_rewards=gold)


def test_reward_that_raises_names_reward_and_prompt(tmp_path):
    def broken(images, prompts, metadata):
        raise KeyError("no OCR model")

    t = _trainer(tmp_path, proxy=[Reward("ocr", broken)])
    with pytest.raises(RewardError, match=r"reward 'ocr' raised KeyError.*no OCR model.*prompts"):
        t.step()


def test_injected_rewards_with_one_name_are_refused(tmp_path):
    """Values are keyed by name: a gold reward named like the proxy would silently replace (and be optimized as)
    the proxy."""
    def ones(images, prompts, metadata):
        return torch.ones(images.shape[0])

    t = _trainer(tmp_path, proxy=[Reward("score", ones)], gold=[Reward("score", ones)])
    with pytest.raises(RewardError, match="two rewards are named 'score'"):
        t.step()


def test_non_finite_reward_names_reward_and_prompt(tmp_path):
    def half_nan(images, prompts, metadata):
        r = images.mean(dim=(1, 2, 3))
        r[1] = float("nan")
        return r

    t = _trainer(tmp_path, gold=[Reward("aesthetic", half_nan)])
    with pytest.raises(RewardError) as info:
        t.step()
    msg = str(info.value)
    assert "'aesthetic'" in msg and "non-finite" in msg
    first_batch = plan_step(0, len(t.prompts), t.cfg, 1, 0)[0]
    assert f"prompt {t.prompts[first_batch[1].prompt_index]!r} (sample 1 of the batch)" in msg


def test_wrong_reward_shape(tmp_path):
    t = _trainer(tmp_path, proxy=[Reward("scalar", lambda im, p, m: im.mean())])
    with pytest.raises(RewardError, match=r"'scalar' returned 1 values for a batch of 4"):
        t.step()


def test_non_finite_loss_skips_then_stops(tmp_path, monkeypatch):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=0", "train.max_nonfinite_in_a_row=2", steps=3))
    before = {n: p.detach().clone() for n, p in t.named_params.items()}
    nan_losses(monkeypatch)
    rec = t.step()
    assert rec["updates"][0]["skipped"] == 1 and rec["skipped_total"] == 1
    assert all(torch.equal(p, before[n]) for n, p in t.named_params.items()), "a skipped update changed weights"
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        t.step()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(str(path))
    config.validate(cfg, world_size=1 if cfg.model.tiny else 8)  # the published recipes assume 8 GPUs
