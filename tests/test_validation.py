"""Bad input gets a clear error naming the argument (issue #2); nothing is clamped or dropped silently.

Python numbers and metadata are checked on the host at once; values in tensors with ``validate="sync"`` here
(the default checks them on the device without a sync: tests/test_no_sync.py)."""
import pytest
import torch

import grpo_guard as gg
from grpo_guard.ops import requests


def base(B=3, dtype=torch.float32):
    v = torch.randn(B, 2, 4, 4, dtype=dtype)
    x = torch.randn(B, 2, 4, 4, dtype=dtype)
    roll = gg.sde_step(v, x, 0.7, 0.6)
    return v, x, roll


def loss(v, x, roll, **kw):
    args = dict(old_model_output=v, method="guard")
    args.update(kw)
    sigma, sigma_next = args.pop("sigma", 0.7), args.pop("sigma_next", 0.6)
    adv = args.pop("advantages", torch.ones(v.shape[0]))
    prev = args.pop("prev_sample", roll.prev_sample)
    return gg.policy_loss(v, x, prev, sigma, sigma_next, adv, **args)


@pytest.mark.parametrize("sigma, sigma_next, match", [
    (0.0, 0.0, "sigma must lie in"), (1.2, 0.5, "sigma must lie in"), (float("nan"), 0.5, "sigma must lie in"),
    (0.5, 0.5, "sigma_next must be < sigma"), (0.5, 0.7, "sigma_next must be < sigma"),
    (0.5, -0.1, "sigma_next must be finite and >= 0"),
])
def test_sigma_range(sigma, sigma_next, match):
    v, x, _ = base()
    with pytest.raises(ValueError, match=match):
        gg.sde_step(v, x, sigma, sigma_next)


def test_sigma_tensors():
    v, x, _ = base()
    with pytest.raises(ValueError, match=r"sigma must be a float or a tensor of shape \(\), \(1,\) or \(3,\)"):
        gg.sde_step(v, x, torch.tensor([0.5, 0.4]), 0.3)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        gg.sde_step(v, x, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.4, 0.4, 0.2]), validate="sync")
    with pytest.raises(TypeError, match="sigma must be a float or a 1-D tensor"):
        gg.sde_step(v, x, "0.5", 0.4)
    with pytest.raises(TypeError, match="sigma_next must be a floating tensor"):
        gg.sde_step(v, x, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0, 0, 0]))
    # 0-dim and (1,) tensors are expanded on the device (no host read), equal to the (B,) form
    a = gg.sde_step(v, x, torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64),
                    prev_sample=x)
    b = gg.sde_step(v, x, torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64),
                    prev_sample=x)
    assert torch.equal(a.log_prob, b.log_prob)


def test_float_sigmas_are_refused_in_cuda_graph_capture(monkeypatch):
    """A Python-float sigma is a kernel argument: a captured CUDA graph would replay it at every timestep."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="Python floats while a CUDA graph is being captured"):
        requests._refuse_float_sigmas_in_capture(torch.device("cuda"))
    requests._refuse_float_sigmas_in_capture(torch.device("cpu"))  # no capture on the CPU


def test_shapes_devices_dtypes():
    v, x, roll = base()
    with pytest.raises(ValueError, match="sample must have the shape of model_output"):
        gg.sde_step(v, x[:, :1], 0.5, 0.4)
    with pytest.raises(ValueError, match="model_output must have a batch dim"):
        gg.sde_step(v[0, 0, 0], x[0, 0, 0], 0.5, 0.4)
    with pytest.raises(TypeError, match="model_output must be float16/bfloat16/float32/float64"):
        gg.sde_step(v.int(), x, 0.5, 0.4)
    with pytest.raises(TypeError, match="dtype mix: sample float64"):
        gg.sde_step(v, x.double(), 0.5, 0.4)
    with pytest.raises(ValueError, match="prev_sample must have the shape of model_output"):
        loss(v, x, roll, prev_sample=roll.prev_sample[:2])
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\)"):
        loss(v, x, roll, advantages=torch.ones(4))
    with pytest.raises(ValueError, match="noise/generator draw a new prev_sample"):
        gg.sde_step(v, x, 0.5, 0.4, prev_sample=x, noise=torch.randn_like(x))


def test_methods_need_their_old_inputs():
    v, x, roll = base()
    with pytest.raises(ValueError, match="method='guard' needs old_prev_sample_mean"):
        loss(v, x, roll, old_model_output=None)
    with pytest.raises(ValueError, match="method='grpo' needs old_log_prob"):
        loss(v, x, roll, old_model_output=None, method="grpo")
    with pytest.raises(ValueError, match="not both"):
        loss(v, x, roll, old_prev_sample_mean=roll.prev_sample_mean)
    with pytest.raises(ValueError, match="method must be one of"):
        loss(v, x, roll, method="ppo")
    with pytest.raises(ValueError, match="dynamics must be one of"):
        loss(v, x, roll, dynamics="ddim")


def test_non_finite_per_sample_inputs():
    v, x, roll = base()
    with pytest.raises(ValueError, match="advantages has non-finite"):
        loss(v, x, roll, advantages=torch.tensor([1.0, float("nan"), 0.0]), validate="sync")
    with pytest.raises(ValueError, match="old_log_prob has non-finite"):
        loss(v, x, roll, method="grpo", old_model_output=None, old_log_prob=torch.tensor([0.0, float("inf"), 0.0]),
             validate="sync")


@pytest.mark.parametrize("kw, match", [
    (dict(clip_range=0.0), "clip_range must be a positive"), (dict(clip_range=1.5), "clip_range must be < 1"),
    (dict(clip_range=float("nan")), "clip_range must be a positive"),
    (dict(adv_clip_max=-1.0), "adv_clip_max must be a positive"),
    (dict(noise_level=0.0), "noise_level must be a positive"),
    (dict(guard_weight="sqrt"), "guard_weight must be one of"),
])
def test_scalar_arguments(kw, match):
    v, x, roll = base()
    with pytest.raises((ValueError, TypeError), match=match):
        loss(v, x, roll, **kw)


def test_rollout_data_must_not_require_grad():
    v, x, roll = base()
    with pytest.raises(ValueError, match="sample is rollout data"):
        loss(v, x.requires_grad_(True), roll)
    v, x, roll = base()
    with pytest.raises(ValueError, match="old_model_output is rollout data"):
        loss(v, x, roll, old_model_output=v.clone().requires_grad_(True))


def test_cps_ratio_norm_at_last_step_refused():
    v, x, _ = base()
    roll = gg.sde_step(v, x, 0.2, 0.1, dynamics="cps")
    with pytest.raises(ValueError, match="transition std, which is 0 for cps"):
        gg.policy_loss(v, x, roll.prev_sample, 0.2, 0.0, torch.ones(3), dynamics="cps", method="guard",
                       old_model_output=v)
    with pytest.raises(ValueError, match="noise_level must be in \\(0, 1\\] for cps"):
        gg.sde_step(v, x, 0.2, 0.1, dynamics="cps", noise_level=1.5)
