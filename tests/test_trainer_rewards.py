"""CLIP score / PickScore rewards loaded from a local path through transformers, offline: a random tiny
CLIPModel + CLIPProcessor is saved with save_pretrained and loaded back through the trainer's reward config."""
import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.models import tiny as tiny_models
from grpo_guard.trainer import RewardError, Trainer
from grpo_guard.trainer import rewards as rw

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red cat", "a blue dog", "digit 7"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip")
    model, processor = tiny_models.clip_model(seed=0)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _spec(name, path, kind="proxy"):
    return f"rewards.{kind}=[{{name: {name}, kwargs: {{model_path: '{path}'}}}}]"


def _expected(path, images, prompts):
    """logit_scale.exp() * cos(image, text) from the model's own forward (logits_per_image), and the scale."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = proc(images=list(rw._uint8(images)), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal(), model.logit_scale.exp()


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_rewards_from_a_local_path(name, clip_dir, tmp_path):
    cfg = tiny("sd3", tmp_path, _spec(name, clip_dir))
    (reward,) = rw.from_specs(cfg.rewards.proxy)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=gen)
    scores = reward.fn(images, PROMPTS, [{}] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # the value is the model's own image-text similarity: cosine (clip_score), logit_scale * cosine / 26 (pickscore)
    logits, logit_scale = _expected(clip_dir, images, PROMPTS)
    want = logits / logit_scale if name == "clip_score" else logits / 26.0
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6)
    # it depends on the prompt (same images, prompts swapped) and on the image
    swapped = reward.fn(images, PROMPTS[::-1], [{}] * 3)
    assert not torch.allclose(swapped[[0, 2]], scores[[0, 2]])
    other = reward.fn(torch.rand(3, 3, 16, 16, generator=gen), PROMPTS, [{}] * 3)
    assert not torch.allclose(other, scores)


def test_clip_rewards_in_a_training_step(clip_dir, tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=0", _spec("clip_score", clip_dir),
                     _spec("pickscore", clip_dir, "gold"), steps=1))
    rec = t.step()
    proxy = torch.cat([b.proxy_reward for b in t.last_batches])
    assert proxy.abs().max() <= 1.0 and proxy.std() > 0  # cosine similarities of distinct images
    assert rec["reward/clip_score_mean"] == pytest.approx(float(proxy.mean()), abs=1e-6)
    assert torch.isfinite(torch.tensor(rec["reward/gold/pickscore_mean"]))
    assert rec["updates"][0]["grad_norm"] > 0


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_missing_weights_path_names_the_reward(name, tmp_path):
    missing = tmp_path / "no_such_model"
    cfg = tiny("sd3", tmp_path, _spec(name, missing))
    with pytest.raises(RewardError, match=rf"reward '{name}'.*could not be built.*no_such_model"):
        rw.from_specs(cfg.rewards.proxy)


@pytest.mark.parametrize("spec,match", [
    ("{name: clip_score, kwargs: {model_pth: x}}", r"reward 'clip_score'.*could not be built: TypeError.*model_pth"),
    ("{name: brightness, kwargs: {scale: 2}}", r"reward 'brightness'.*could not be built: TypeError"),
])
def test_unknown_reward_kwargs_are_errors(spec, match, tmp_path):
    cfg = tiny("sd3", tmp_path, f"rewards.proxy=[{spec}]")
    with pytest.raises(RewardError, match=match):
        rw.from_specs(cfg.rewards.proxy)
