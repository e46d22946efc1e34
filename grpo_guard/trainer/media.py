"""What an evaluation writes to look at: ``<output_dir>/eval/step-XXXXXXXX.png``, one row per sample (images: the
image; videos: :data:`FRAMES` frames evenly spaced, first and last included), with ``.txt`` listing the prompts
row by row; for videos also ``step-XXXXXXXX.gif``, the rows animated side by side at :data:`FPS` frames per
second."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .video_rewards import frame_indices

FRAMES = 8
FPS = 8


def _uint8(x: torch.Tensor):
    """(..., H, W, 3) float in [0, 1] -> uint8 numpy."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def strip(pixels: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    """Images (B, 3, H, W) or videos (B, F, H, W, 3) -> one grid (rows = samples) as (H', W', 3) in [0, 1]."""
    if pixels.dim() == 4:  # images: one column
        cells = pixels.permute(0, 2, 3, 1)[:, None]
    else:
        cells = pixels[:, frame_indices(pixels.shape[1], frames=frames)]
    B, n, H, W, _ = cells.shape
    return cells.permute(0, 2, 1, 3, 4).reshape(B * H, n * W, 3)


def save_eval(directory: str, step: int, pixels: torch.Tensor, prompts: Sequence[str]) -> str:
    """Write the strip (and for videos the GIF) of one evaluation; returns the PNG's path."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"step-{step:08d}")
    Image.fromarray(_uint8(strip(pixels))).save(stem + ".png")
    with open(stem + ".txt", "w") as f:
        f.write("".join(p.replace("\n", " ") + "\n" for p in prompts))
    if pixels.dim() == 5:  # (B, F, H, W, 3): each frame shows the samples side by side
        B, F, H, W, _ = pixels.shape
        frames = _uint8(pixels.permute(1, 2, 0, 3, 4).reshape(F, H, B * W, 3))
        images = [Image.fromarray(f) for f in frames]
        images[0].save(stem + ".gif", save_all=True, append_images=images[1:], duration=int(1000 / FPS), loop=0)
    return stem + ".png"
