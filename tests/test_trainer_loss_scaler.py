"""flow_grpo's precision mode through accelerate's GPU code path, on a CPU: fp16 native AMP with a loss scaler.

On a GPU, ``run.mixed_precision: fp16`` makes accelerate autocast the prepared model's forward to float16 (its
outputs upcast to float32) and wrap the optimizer with a ``GradScaler``. On a CPU accelerate does neither, so
these tests build that accelerator themselves: ``native_amp = True`` and ``torch.amp.GradScaler("cpu")``, which
is the same class and the same accelerate code (``backward`` scales the loss, ``clip_grad_norm_`` unscales,
the optimizer's ``step`` runs ``scaler.step`` + ``scaler.update`` and reports a skipped step). What they check
is the trainer's side of it (trainer/update.py): a scaler overflow is skipped and logged as ``overflow``, not
counted as a failure; a non-finite loss still closes the scaler's step; per-timestep gradient norms are
unscaled; the first update is exactly on-policy."""
import pytest
import torch

from _trainer import nan_losses, one_thread, tiny  # noqa: F401 (fixture)

import grpo_guard
from grpo_guard.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

FP16 = ("run.mixed_precision=fp16", "model.latent_dtype=float32", "model.vae_dtype=float32",
        "model.text_encoder_dtype=float16", "train.learning_rate=0.05", "run.save_every=0",
        "train.timestep_grad_norms=true")


@pytest.fixture
def accelerator():
    """``accelerator(init_scale)``: a CPU accelerator with fp16 mixed precision on accelerate's native-AMP path
    and a loss scaler of that initial scale (None: accelerate's CPU default, float16 autocast by the trainer and
    no scaler)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make(init_scale):
        AcceleratorState._reset_state(True)
        acc = Accelerator(cpu=True, mixed_precision="fp16")
        if init_scale is not None:
            acc.native_amp = True  # what accelerate sets for fp16 on a GPU
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return acc

    yield make
    AcceleratorState._reset_state(True)


def _trainer(tmp_path, acc, *overrides, steps=1):
    return Trainer(tiny("sd3", tmp_path, *FP16, *overrides, steps=steps), accelerator=acc)


def test_the_accelerator_runs_accelerates_gpu_fp16_path(tmp_path, accelerator):
    from accelerate.optimizer import AcceleratedOptimizer

    acc = accelerator(2.0 ** 10)
    t = _trainer(tmp_path, acc)
    assert t.updater.scaler is acc.scaler
    assert isinstance(t.optimizer, AcceleratedOptimizer) and t.optimizer.scaler is acc.scaler
    rec = t.step()
    assert t.last_batches[0].old_velocity.dtype == torch.float16
    assert acc.scaler.get_scale() == 2.0 ** 10  # no overflow, no growth yet (growth_interval 2000)
    first = rec["updates"][0]
    assert first["skipped"] == 0 and first["overflow"] == 0
    assert all(d["ratio_mean"] == 1.0 and d["ratio_std"] == 0.0 for d in first["timesteps"])


def test_gradient_norms_are_unscaled(tmp_path, accelerator):
    """The same step with and without the scaler: the logged norms (global and per timestep) agree to float16's
    resolution of the backward, not to a factor of the scale."""
    recs = []
    for scale in (None, 2.0 ** 12):
        t = _trainer(tmp_path / str(scale), accelerator(scale))
        recs.append(t.step()["updates"][0])
    plain, scaled = recs
    assert scaled["grad_norm"] == pytest.approx(plain["grad_norm"], rel=2e-3)
    for a, b in zip(plain["timesteps"], scaled["timesteps"]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3, abs=1e-7)
        assert b["loss"] == a["loss"]  # the logged loss is the unscaled one


def test_an_overflow_is_skipped_logged_and_not_a_failure(tmp_path, accelerator):
    """A scale so large that float16 gradients overflow: every update of the step is skipped by the scaler (the
    weights, the LR schedule and the EMA do not move), logged as ``overflow``, and does not count towards
    ``train.max_nonfinite_in_a_row`` (1 here: a single counted failure would stop the run). The scaler lowers
    its scale each time; once it is small enough the updates apply."""
    acc = accelerator(2.0 ** 40)
    t = _trainer(tmp_path, acc, "train.updates_per_step=2", "train.max_nonfinite_in_a_row=1", "train.ema=true",
                 steps=2)
    params = {n: p.detach().clone() for n, p in t.named_params.items()}
    ema = [s.clone() for s in t.ema.shadow]
    epoch = t.lr_scheduler.last_epoch
    rec = t.step()
    assert [(u["skipped"], u["overflow"]) for u in rec["updates"]] == [(1, 1), (1, 1)]
    assert rec["skipped_total"] == 2 and t.nonfinite_in_a_row == 0
    assert all(torch.equal(p, params[n]) for n, p in t.named_params.items()), "an overflow changed the weights"
    assert all(torch.equal(a, b) for a, b in zip(t.ema.shadow, ema)) and t.lr_scheduler.last_epoch == epoch
    assert acc.scaler.get_scale() == 2.0 ** 38  # backed off once per skipped update
    acc.scaler.update(2.0 ** 10)  # as if it had backed off further
    rec = t.step()
    assert [(u["skipped"], u["overflow"]) for u in rec["updates"]] == [(0, 0), (0, 0)]
    assert any(not torch.equal(p, params[n]) for n, p in t.named_params.items())
    assert t.lr_scheduler.last_epoch == epoch + 2


def test_a_non_finite_loss_is_a_failure_and_closes_the_scalers_step(tmp_path, accelerator, monkeypatch):
    """A NaN loss is the trainer's skip (counted), not the scaler's: the optimizer is not stepped, so the trainer
    must end the scaler's step itself (``clip_grad_norm_`` unscaled the gradients); the next step then runs."""
    acc = accelerator(2.0 ** 10)
    t = _trainer(tmp_path, acc, "train.max_nonfinite_in_a_row=2", steps=2)
    real = nan_losses(monkeypatch)
    rec = t.step()
    assert (rec["updates"][0]["skipped"], rec["updates"][0]["overflow"]) == (1, 0)
    assert t.nonfinite_in_a_row == 1 and acc.scaler.get_scale() == 2.0 ** 9  # NaN gradients: the scale backs off
    monkeypatch.setattr(grpo_guard, "policy_loss", real)
    rec = t.step()  # raises "unscale_() has already been called" if the scaler's step was left open
    assert (rec["updates"][0]["skipped"], rec["updates"][0]["overflow"]) == (0, 0) and t.nonfinite_in_a_row == 0
