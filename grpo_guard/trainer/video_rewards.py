"""Video rewards: callables ``(videos, prompts, metadata) -> (B,)`` with ``videos`` the decoded frames
(B, F, H, W, 3) float in [0, 1], as a video model's (Wan's) rollout gives them.

- ``temporal_consistency``: minus the mean absolute change between consecutive frames,
  ``-mean_t mean_pixels |f_{t+1} - f_t|``, in [-1, 0]; 0 for a still video. Needs no download.
- ``motion``: the mean absolute change between consecutive frames, in [0, 1] (the same statistic with the other
  sign): a still video scores 0. Together they show video reward hacking: optimizing consistency alone freezes the
  video, which ``motion`` as a gold reward exposes.
- ``per_frame``: any image reward (a built-in such as ``pickscore`` / ``clip_score`` from a local path, or
  ``"module:callable"``) applied to frames and reduced over them: ``mean`` (flow_grpo's), ``min`` (the worst
  frame) or ``max``. ``stride`` keeps every k-th frame (flow_grpo's OCR reward: 4), ``frames`` then keeps at most
  that many, evenly spaced (first and last included); ``batch_frames`` bounds the images per call of the image
  reward (0: all of the batch's frames in one call).
"""
from __future__ import annotations

from typing import Callable, Dict, Union

import torch


def _check(videos: torch.Tensor, name: str, min_frames: int = 1) -> None:
    if videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{name} scores videos (B, F, H, W, 3); got a tensor of shape {tuple(videos.shape)} (an "
                         "image model's (B, 3, H, W) images?)")
    if videos.shape[1] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames per video, got {videos.shape[1]}")


def frame_change(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of consecutive frames, per video: ``mean_t mean |f_{t+1} - f_t|`` (B,) float32."""
    v = videos.float()
    return (v[:, 1:] - v[:, :-1]).abs().flatten(1).mean(1)


def temporal_consistency(videos, prompts, metadata):
    """``-frame_change``: 0 for a still video, lower the more consecutive frames differ."""
    _check(videos, "temporal_consistency", 2)
    return -frame_change(videos)


def motion(videos, prompts, metadata):
    """``frame_change``: how much consecutive frames differ (0 for a still video)."""
    _check(videos, "motion", 2)
    return frame_change(videos)


REDUCTIONS = {"mean": lambda x: x.mean(1), "min": lambda x: x.min(1).values, "max": lambda x: x.max(1).values}


def frame_indices(num_frames: int, stride: int = 1, frames: int = 0) -> list:
    """Every ``stride``-th frame from the first; then at most ``frames`` of those, evenly spaced (first and last
    kept)."""
    idx = list(range(0, num_frames, stride))
    if frames and len(idx) > frames:
        pos = torch.linspace(0, len(idx) - 1, frames).round().long().tolist()
        idx = [idx[p] for p in pos]
    return idx


class PerFrame:
    """An image reward applied to the frames of each video and reduced over them (see the module doc)."""

    gg_modality, gg_input = "video", "pixels"  # (rewards.declare)

    def __init__(self, reward: Union[str, Callable], reduction: str = "mean", stride: int = 1, frames: int = 0,
                 batch_frames: int = 0, kwargs: Dict = None):
        from . import rewards as rw

        if reduction not in REDUCTIONS:
            raise ValueError(f"per_frame: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
        if stride < 1 or frames < 0 or batch_frames < 0:
            raise ValueError(f"per_frame: stride must be >= 1 and frames, batch_frames >= 0; got stride={stride}, "
                             f"frames={frames}, batch_frames={batch_frames}")
        self.fn = rw.resolve(reward, kwargs) if isinstance(reward, str) else reward
        if rw.modality_of(self.fn) == "video" or rw.wants_latents(self.fn):
            raise ValueError(f"per_frame wraps an image reward of pixels; {reward!r} is a video or latent reward")
        self.name = reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)
        self.reduction, self.stride, self.frames, self.batch_frames = reduction, stride, frames, batch_frames
        self.reward = rw.Reward(self.name, self.fn)

    def __call__(self, videos, prompts, metadata):
        from . import rewards as rw

        _check(videos, f"per_frame({self.name})")
        B, F = videos.shape[:2]
        idx = frame_indices(F, self.stride, self.frames)
        k = len(idx)
        images = videos[:, idx].permute(0, 1, 4, 2, 3).reshape(B * k, 3, *videos.shape[2:4])
        ps = [p for p in prompts for _ in range(k)]
        ms = [m for m in metadata for _ in range(k)]
        step = self.batch_frames or B * k
        inner = [self.reward]
        # each call checked as any reward's (one value per frame, finite; errors name the frames' prompts)
        scores = [rw.evaluate(inner, images[i:i + step], ps[i:i + step], ms[i:i + step])[self.name]
                  for i in range(0, B * k, step)]
        return REDUCTIONS[self.reduction](torch.cat(scores).view(B, k))


def per_frame(reward, reduction: str = "mean", stride: int = 1, frames: int = 0, batch_frames: int = 0,
              kwargs: Dict = None) -> PerFrame:
    """``PerFrame(...)``: e.g. ``per_frame("pickscore", kwargs={"model_path": ...}, stride=4)`` or, in a config,
    ``{name: per_frame, kwargs: {reward: pickscore, stride: 4, kwargs: {model_path: ...}}}``."""
    return PerFrame(reward, reduction, stride, frames, batch_frames, kwargs)


def _video(fn):
    fn.gg_modality, fn.gg_input = "video", "pixels"  # (rewards.declare)
    return lambda: fn


BUILTINS = {
    "temporal_consistency": _video(temporal_consistency),
    "motion": _video(motion),
    "per_frame": per_frame,
}
