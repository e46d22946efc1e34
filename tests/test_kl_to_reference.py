"""gg.kl_to_reference: SPEC §4's KL of one step, mean_D (mu_theta - mu_ref)^2 / (2 std_dev_t^2)."""
import math

import pytest
import torch

import grpo_guard as gg


def test_value_uses_std_dev_t_not_the_transition_std(seed):
    v, v_ref, x = (torch.randn(3, 4, 8, dtype=torch.float64) for _ in range(3))
    xp = x + 0.1 * torch.randn_like(x)
    sigma, nxt, eta = 0.6, 0.5, 0.7
    cur = gg.sde_step(v, x, sigma, nxt, noise_level=eta, prev_sample=xp)
    ref = gg.sde_step(v_ref, x, sigma, nxt, noise_level=eta, prev_sample=xp)
    kl = gg.kl_to_reference(cur.prev_sample_mean, ref.prev_sample_mean, cur.std_dev_t)
    std_dev_t = eta * math.sqrt(sigma / (1 - sigma))  # SPEC §2, flow, sigma < 1
    beta_dt = (1 + eta ** 2 / 2) * (nxt - sigma)      # mu_theta - mu_ref = b (v - v_ref)
    want = (beta_dt * (v - v_ref)).square().flatten(1).mean(1) / (2 * std_dev_t ** 2)
    torch.testing.assert_close(kl, want)
    assert torch.equal(gg.kl_to_reference(ref.prev_sample_mean, ref.prev_sample_mean, ref.std_dev_t),
                       torch.zeros(3, dtype=torch.float64))


def test_gradcheck_and_errors(seed):
    mean = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    mean_ref = torch.randn(2, 5, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: gg.kl_to_reference(m, mean_ref, std), (mean,))
    with pytest.raises(ValueError, match=r"std_dev_t must be a tensor of shape \(2,\)"):
        gg.kl_to_reference(mean, mean_ref, 0.5)
    with pytest.raises(ValueError, match="ref_prev_sample_mean must have the shape"):
        gg.kl_to_reference(mean, mean_ref[:1], std)
