"""scikit-learn's bundled handwritten digits (1,797 images, 8 x 8, 16 gray levels; no download)."""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

PROMPT = "a handwritten {}"


def prompt_for(digit: int) -> str:
    return PROMPT.format(int(digit))


def digit_of(prompt: str) -> int:
    """The digit a demo prompt asks for (its last character)."""
    return int(prompt.strip()[-1])


@lru_cache(maxsize=1)
def digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in [0, 1], labels (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def as_latents(images: np.ndarray) -> torch.Tensor:
    """Images in [0, 1] -> model space (N, 1, 8, 8) in [-1, 1]."""
    return torch.from_numpy(images).float().unsqueeze(1) * 2 - 1


def split(seed: int = 0, holdout: float = 0.25):
    """A fixed train / held-out split (indices), stratified by a seeded shuffle per class."""
    _, y = digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * holdout))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(test))
