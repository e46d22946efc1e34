"""``grpo-guard demo``: the rewards (the proxy is exploitable, the golds are not fooled by it), the shipped base
model, deterministic pretraining, and a very short demo end to end (report + figures with finite numbers)."""
import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from grpo_guard.demo import data, rewards  # noqa: E402


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _held_out(digit=None):
    images, labels = data.digits()
    held = rewards._fitted()["held"]
    if digit is not None:
        held = held[labels[held] == digit]
    x = torch.from_numpy(images[held]).unsqueeze(1)
    return x, [data.prompt_for(c) for c in labels[held]]


def test_rewards_rank_real_digits():
    """On held-out real digits: the proxy is a real (weak) classifier, the gold classifier a strong one, and
    realism prefers real digits to noise."""
    x, prompts = _held_out()
    labels = np.array([data.digit_of(p) for p in prompts])
    proxy = rewards.ProxyLogit()
    logits = torch.stack([proxy(x, [data.prompt_for(d)] * len(x)) for d in range(10)], 1)
    acc = (logits.argmax(1).numpy() == labels).mean()
    assert 0.6 < acc < 0.95, acc  # fit on 30 images: useful but weak
    gold = rewards.DigitProb()
    probs = torch.stack([gold.raw(x, [data.prompt_for(d)] * len(x)) for d in range(10)], 1)
    assert torch.allclose(probs.sum(1), torch.ones(len(x)), atol=1e-4)
    assert (probs.argmax(1).numpy() == labels).mean() > 0.95
    noise = torch.rand(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert rewards.Realism().raw(x).mean() > 3 * rewards.Realism().raw(noise).mean()


def test_proxy_is_exploitable():
    """Gradient ascent on the proxy from real 7s: the proxy rises far above any real 7's, while realism and the
    gold mean (each normalized by the real digits' score, as the demo normalizes by the base model) fall."""
    x0, prompts = _held_out(7)
    proxy, prob, real = rewards.ProxyLogit(), rewards.DigitProb(), rewards.Realism()
    x = x0.clone().requires_grad_(True)
    for _ in range(30):
        (g,) = torch.autograd.grad(proxy(x, prompts).sum(), x)
        with torch.no_grad():
            x += 0.02 * g.sign()
            x.clamp_(0, 1)
    x = x.detach()
    before, after = proxy(x0, prompts), proxy(x, prompts)
    assert after.mean() > before.max() + 1.0
    r0, r1 = real.raw(x0).mean(), real.raw(x).mean()
    p0, p1 = prob.raw(x0, prompts).mean(), prob.raw(x, prompts).mean()
    assert r1 < 0.8 * r0
    assert (p1 / p0 + r1 / r0) / 2 < 0.9
    # the reward callables have the trainer's signature and shapes
    proxy_list, gold_list = rewards.make(digit_scale=float(p0), realism_scale=float(r0))
    assert [r.name for r in gold_list] == ["digit_prob", "realism"]
    out = gold_list[1].fn(x0, prompts, [{}] * len(prompts))
    assert out.shape == (len(prompts),) and abs(float(out.mean()) - 1.0) < 1e-5


def test_pretrain_is_deterministic(one_thread):
    from grpo_guard.demo import model, pretrain

    a, _ = pretrain.pretrain(seed=3, iters=3, batch_size=16, progress=False)
    b, _ = pretrain.pretrain(seed=3, iters=3, batch_size=16, progress=False)
    c, _ = pretrain.pretrain(seed=4, iters=3, batch_size=16, progress=False)
    sa, sb, sc = model.state_dict(a), model.state_dict(b), model.state_dict(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_shipped_base_model_draws_the_prompted_digit(one_thread):
    """The packaged weights load and the base model draws recognizable, realistic digits (scores close to
    held-out real digits'), so gold = 1.00 means something."""
    from grpo_guard.demo import experiment

    s = experiment.Settings(eval_per_digit=2)
    base = experiment.base_eval(s)
    x, prompts = _held_out()
    assert base["images"].shape[0] == 20 and base["images"].shape[-2:] == (8, 8)
    assert base["raw"]["digit_prob"] > 0.7
    assert base["raw"]["realism"] > 0.75 * float(rewards.Realism().raw(x).mean())


def test_demo_end_to_end(tmp_path, one_thread):
    from grpo_guard.demo import cli

    out = tmp_path / "demo"
    cli.main(["--steps", "2", "--eval-every", "1", "--out", str(out), "--no-progress"])
    report = (out / "REPORT.md").read_text()
    for name in ("rewards.png", "ratio_per_timestep.png", "grad_norm_per_timestep.png", "samples.png"):
        data_ = (out / name).read_bytes()
        assert data_[:8] == b"\x89PNG\r\n\x1a\n" and len(data_) > 5000, name
        assert f"({name})" in report
    row = next(line for line in report.splitlines() if line.startswith("| tiny SD3 digits"))
    nums = [float(v) for v in re.findall(r"-?\d+\.\d+", row)]
    assert len(nums) == 5 and all(math.isfinite(v) for v in nums)
    for m in ("grpo", "guard"):
        lines = [json.loads(s) for s in (out / m / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2]
        assert all(math.isfinite(r["reward/gold/realism_mean"]) for r in lines)
        assert any((out / m / "tensorboard").iterdir())
        ev = json.loads((out / m / "eval.json").read_text())["evals"]
        assert sorted(ev) == ["0", "1", "2"] and all(math.isfinite(v) for e in ev.values() for v in e.values())


def test_clip_range_flag_is_checked(tmp_path):
    from grpo_guard.demo.cli import main as demo_main
    with pytest.raises(SystemExit, match=r"--clip-range must be in \(0, 1\), got 2.0"):
        demo_main(["--clip-range", "2", "--out", str(tmp_path / "x"), "--steps", "1"])
