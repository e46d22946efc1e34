"""gg.group_advantages against a per-group loop in numpy (SPEC §3)."""
import numpy as np
import pytest
import torch

import grpo_guard as gg


def numpy_oracle(rewards, groups, global_std, eps=1e-4):
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    all_std = r.std()
    for g in set(groups):
        idx = [i for i, h in enumerate(groups) if h == g]
        mean = r[idx].mean()
        std = all_std if global_std else r[idx].std()  # population std (ddof 0)
        out[idx] = (r[idx] - mean) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [False, True])
def test_matches_per_group_loop(global_std, seed):
    n_groups, size = 5, 6
    prompts = [f"prompt {i}" for i in torch.randint(0, 1000, (n_groups,)).tolist()]
    groups = [p for p in prompts for _ in range(size)]
    perm = torch.randperm(len(groups)).tolist()
    groups = [groups[i] for i in perm]
    rewards = torch.randn(len(groups)) * 3 + 1
    got = gg.group_advantages(rewards, groups, global_std=global_std)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got.numpy(), numpy_oracle(rewards.numpy(), groups, global_std), rtol=1e-6, atol=1e-6)
    # integer ids give the same as hashable labels
    ids = torch.tensor([prompts.index(g) for g in groups])
    torch.testing.assert_close(gg.group_advantages(rewards, ids, global_std=global_std), got)


def test_properties(seed):
    rewards = torch.randn(12, dtype=torch.float64)
    ids = torch.arange(12) // 4
    adv = gg.group_advantages(rewards, ids)
    assert adv.dtype == torch.float64
    for g in range(3):
        a = adv[ids == g]
        assert abs(a.sum().item()) < 1e-9                     # zero mean per group
        r = rewards[ids == g]
        assert abs(a.std(unbiased=False).item() - r.std(unbiased=False).item() / (r.std(unbiased=False).item() + 1e-4)) < 1e-9
    # a group whose rewards are all equal gets zero advantages, not a division by zero
    flat = gg.group_advantages(torch.tensor([2.0, 2.0, 1.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert flat[:2].abs().max().item() == 0.0 and torch.isfinite(flat).all()


def test_bad_input():
    with pytest.raises(ValueError, match="rewards has non-finite"):
        gg.group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), validate="sync")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(gg.InvalidInputError, match="group_advantages: rewards must be finite"):
            gg.group_advantages(torch.tensor([1.0, 2.0, bad, 0.5]), torch.tensor([0, 0, 1, 1]))
            gg.check_errors()
    gg.group_advantages(torch.tensor([1.0, 3.0e38, -3.0e38, 0.5]), torch.tensor([0, 1, 0, 1]))
    gg.check_errors()  # large but finite rewards pass
    with pytest.raises(ValueError, match="group_ids must have the shape"):
        gg.group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="rewards must be a 1-D floating tensor"):
        gg.group_advantages(torch.tensor([[1.0]]), torch.tensor([[0]]))
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        gg.group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="eps must be > 0"):
        gg.group_advantages(torch.tensor([1.0, 2.0]), [0, 0], eps=0.0)
