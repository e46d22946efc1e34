"""Helpers for the trainer tests: the tiny offline configs with overrides."""
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from grpo_guard.trainer import config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(family: str, tmp_path, *overrides, steps: int = 2):
    """The tiny config of ``family`` writing to ``tmp_path``, no progress bar, with ``overrides``."""
    return config.load(str(CONFIGS / f"tiny_{family}.yaml"),
                       [f"run.output_dir={tmp_path}", f"run.num_steps={steps}", "run.progress=false", *overrides])


@pytest.fixture(autouse=False)
def one_thread():
    """The tiny models run ~8x faster on one intra-op thread than on two contended ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def nan_losses(monkeypatch):
    """Make every ``grpo_guard.policy_loss`` call return a NaN loss (its stats unchanged), as a trainer would see
    it; returns the real function (``monkeypatch.setattr(grpo_guard, "policy_loss", real)`` restores it)."""
    import grpo_guard

    real = grpo_guard.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(grpo_guard, "policy_loss", nan_loss)
    return real
