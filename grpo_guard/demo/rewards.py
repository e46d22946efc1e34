"""The demo's rewards: one exploitable proxy (optimized) and two gold scores (logged, never optimized).

All are plain callables ``(images, prompts, metadata) -> tensor (B,)`` as the trainer expects, computed in
torch (differentiable in the images) from models fit once, deterministically, on scikit-learn's digits.
Images are (B, C, 8, 8) in [0, 1] (channels averaged); the prompted digit is the prompt's last character.

- ``proxy``: the **logit** of the prompted digit under a linear classifier (multinomial logistic regression)
  fit on only 3 images per digit with weak regularization. Like a real learned reward model it ranks real
  digits sensibly, but it is linear and unbounded: it is maximized by saturated, off-manifold pixel patterns.
- ``digit_prob`` (gold): the probability of the prompted digit under an independent, stronger classifier:
  a Gaussian-kernel (Nadaraya-Watson) classifier over the ~1,350 training digits (bandwidth ``d0 / 2``).
- ``realism`` (gold): ``exp(-d / d0)``, ``d`` the distance from the image to its 5th nearest real digit, ``d0``
  the same statistic's median over held-out real digits.

Gold scores are divided by ``scale`` (set to the base model's mean by the demo), so the base model scores 1.00.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List

import numpy as np
import torch

from . import data
from .data import digit_of

PROXY_PER_CLASS = 3
KNN = 5


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=1).flatten(1)  # (B, 64) in [0, 1]


def _targets(prompts, device) -> torch.Tensor:
    return torch.tensor([digit_of(p) for p in prompts], dtype=torch.long, device=device)


@lru_cache(maxsize=1)
def _fitted(seed: int = 0):
    """Fit the proxy and gold models (deterministic). Returns a dict of float64 numpy arrays."""
    from sklearn.linear_model import LogisticRegression

    images, labels = data.digits()
    X = images.reshape(len(images), -1).astype(np.float64)
    train, held = data.split(seed)
    rng = np.random.default_rng(seed + 1)
    few = np.concatenate([rng.choice(train[labels[train] == c], PROXY_PER_CLASS, replace=False) for c in range(10)])
    lr = LogisticRegression(C=100.0, max_iter=5000).fit(X[few], labels[few])
    ref = X[train]
    d = torch.cdist(torch.from_numpy(X[held]), torch.from_numpy(ref))
    d_held = d.topk(KNN, dim=1, largest=False).values[:, -1].numpy()
    return {"proxy_w": lr.coef_, "proxy_b": lr.intercept_, "ref": ref, "ref_y": labels[train],
            "d0": float(np.median(d_held)), "few": few, "held": held}


def _t(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)


class ProxyLogit:
    """Exploitable proxy: logit of the prompted digit under a 30-sample linear classifier."""

    name = "proxy_logit"

    def __init__(self, seed: int = 0):
        self.m = _fitted(seed)

    def __call__(self, images, prompts, metadata=None):
        x = _flat(images)
        logits = x @ _t(self.m["proxy_w"], x.device).T + _t(self.m["proxy_b"], x.device)
        return logits.gather(1, _targets(prompts, x.device)[:, None])[:, 0]


class DigitProb:
    """Gold: probability of the prompted digit under the kernel classifier, divided by ``scale``."""

    name = "digit_prob"

    def __init__(self, seed: int = 0, scale: float = 1.0):
        self.m, self.scale = _fitted(seed), float(scale)

    def raw(self, images, prompts):
        x = _flat(images)
        h = self.m["d0"] / 2
        logk = -torch.cdist(x, _t(self.m["ref"], x.device)).pow(2) / (2 * h * h)  # (B, N) log kernel weights
        same = torch.as_tensor(self.m["ref_y"], device=x.device)[None, :] == _targets(prompts, x.device)[:, None]
        log_p = logk.masked_fill(~same, float("-inf")).logsumexp(1) - logk.logsumexp(1)
        return log_p.exp()

    def __call__(self, images, prompts, metadata=None):
        return self.raw(images, prompts) / self.scale


class Realism:
    """Gold: closeness to the manifold of real digits, ``exp(-d_5NN / d0)``, divided by ``scale``."""

    name = "realism"

    def __init__(self, seed: int = 0, scale: float = 1.0):
        self.m, self.scale = _fitted(seed), float(scale)

    def raw(self, images, prompts=None):
        x = _flat(images)
        d = torch.cdist(x, _t(self.m["ref"], x.device))
        dk = d.topk(KNN, dim=1, largest=False).values[:, -1]
        return torch.exp(-dk / self.m["d0"])

    def __call__(self, images, prompts, metadata=None):
        return self.raw(images, prompts) / self.scale


def make(seed: int = 0, digit_scale: float = 1.0, realism_scale: float = 1.0):
    """(proxy rewards, gold rewards) as trainer :class:`~grpo_guard.trainer.rewards.Reward` lists."""
    from ..trainer.rewards import Reward

    proxy = [Reward(ProxyLogit.name, ProxyLogit(seed))]
    gold = [Reward(DigitProb.name, DigitProb(seed, digit_scale)), Reward(Realism.name, Realism(seed, realism_scale))]
    return proxy, gold


def score_all(images: torch.Tensor, prompts: List[str], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Unnormalized scores of a batch: proxy logit, digit probability, realism (each (B,))."""
    return {"proxy_logit": ProxyLogit(seed)(images, prompts), "digit_prob": DigitProb(seed).raw(images, prompts),
            "realism": Realism(seed).raw(images, prompts)}
