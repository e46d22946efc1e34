"""Checkpoints: 4 steps == 2 steps + resume + 2 steps, bit for bit; incomplete checkpoints are never resumed."""
import json
import os

import pytest
import torch

from _trainer import CONFIGS, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import Trainer, checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ("train.updates_per_step=2", "train.warmup_steps=3", "train.ema=true", "run.save_every=2",
             "train.learning_rate=0.01")


@pytest.mark.parametrize("family,extra", [("sd3", ()), ("wan", ()), ("wan", ("model.expert=both",))],
                         ids=["sd3", "wan", "wan2.2-both-experts"])
def test_resume_is_bit_exact(family, extra, tmp_path):
    """(Wan: with its evaluation every 2 steps, strips included; Wan 2.2's two experts trained as one module.)"""
    sets = OVERRIDES + extra
    a = Trainer(tiny(family, tmp_path / "a", *sets, steps=4))
    a.train()

    b1 = Trainer(tiny(family, tmp_path / "b", *sets, steps=2))
    b1.train()
    b2 = Trainer(tiny(family, tmp_path / "b", *sets, steps=4))
    assert b2.resume() and b2.global_step == 2
    b2.train()

    for n, p in a.named_params.items():
        assert torch.equal(p, b2.named_params[n]), n
    for s_a, s_b in zip(a.ema.shadow, b2.ema.shadow):
        assert torch.equal(s_a, s_b)
    opt_a, opt_b = a.optimizer.state_dict()["state"], b2.optimizer.state_dict()["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"])
    assert a.lr_scheduler.get_last_lr() == b2.lr_scheduler.get_last_lr()
    # the logged history is identical too (resume drops nothing and duplicates nothing)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    la = [strip(json.loads(s)) for s in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [strip(json.loads(s)) for s in open(tmp_path / "b" / "metrics.jsonl")]
    assert la == lb and [r["step"] for r in la] == [1, 2, 3, 4]
    # and training did something: the weights differ from the 2-step checkpoint's
    assert not all(torch.equal(p, b1.named_params[n]) for n, p in a.named_params.items())


def test_incomplete_checkpoints_are_ignored(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=1", steps=1))
    t.train()
    root = t.checkpoint_dir
    good = checkpoint.latest(root)
    assert good.endswith("step-00000001")
    # a run killed mid-write: its temporary dir, and a step dir without state.json, must not be picked up
    os.makedirs(os.path.join(root, ".tmp-step-00000002"))
    os.makedirs(os.path.join(root, "step-00000003"))
    open(os.path.join(root, "step-00000003", "weights.safetensors"), "w").close()
    assert checkpoint.latest(root) == good
    t2 = Trainer(tiny("sd3", tmp_path, "run.save_every=1", steps=1))
    assert t2.resume() and t2.global_step == 1


def test_resume_rejects_another_model(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=1", steps=1))
    t.train()
    other = Trainer(tiny("sd3", tmp_path, "model.lora.rank=2", steps=1))
    with pytest.raises(checkpoint.CheckpointError, match="weights do not match"):
        other.resume()


def test_cli_reports_a_checkpoint_it_cannot_resume_in_one_line(tmp_path, capsys):
    from grpo_guard.trainer.cli import main as train_main

    base = [str(CONFIGS / "tiny_sd3.yaml"), "--output-dir", str(tmp_path), "--set", "run.num_steps=1",
            "--set", "run.progress=false"]
    assert train_main(base) == 0
    rc = train_main(base + ["--set", "model.lora.rank=2", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "grpo-guard train: error:" in err and "weights do not match the model" in err
    assert train_main(base + ["--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
