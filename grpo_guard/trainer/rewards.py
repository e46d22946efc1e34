"""Rewards: plain callables ``(images, prompts, metadata) -> tensor (B,)``.

``images`` is a float tensor (B, 3, H, W) in [0, 1] on the training device -- for a video model (Wan) the
decoded frames (B, F, H, W, 3) in [0, 1] --, ``prompts`` a list of B strings, ``metadata`` a list of B dicts
(from a .jsonl prompt file). A callable can declare (:func:`declare`) the ``modality`` it scores ("image" /
"video"; undeclared: either, unchecked), so that an image reward given to a video model is refused before the
model loads (the built-ins are declared),
and ``input="latents"`` to receive the final latents instead of pixels (SD3: (B, C, h, w); Flux: unpacked to
(B, C, h, w); Wan: (B, C, F', h, w)): when no reward needs pixels the VAE decode is skipped. Several rewards with
weights form the optimized (proxy) reward; "gold" rewards are computed and logged but never optimized, which is
how over-optimization shows (proxy up, gold down). A reward that raises, or returns a wrong shape or a non-finite
value, stops the run with :class:`RewardError` naming the reward and the prompt.

Built-ins needing no download: ``jpeg_compressibility`` (minus the JPEG size in kB / 500, flow_grpo's),
``jpeg_incompressibility``, ``brightness`` and ``contrast`` (image statistics); for video (:mod:`.video_rewards`)
``temporal_consistency``, ``motion`` and ``per_frame`` (any image reward applied to frames, with a reduction).
``clip_score`` and ``pickscore`` load local weights through transformers (``model_path``; ``processor_path``
defaults to it). Anything else: ``name: "package.module:function"`` -- a reward callable, or a factory called with
``kwargs``.
"""
from __future__ import annotations

import importlib
import io
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, List[str], List[dict]], torch.Tensor]


class RewardError(RuntimeError):
    """A reward failed or produced an unusable value; the message names the reward and the prompt."""


MODALITIES = ("image", "video")


def declare(fn, modality=None, input: str = "pixels"):
    """Mark ``fn`` as scoring ``modality`` ("image", "video", None = either) from ``input`` ("pixels" or
    "latents"), in the attributes ``gg_modality`` / ``gg_input``; returns ``fn`` (usable as a decorator through
    functools.partial or a lambda). A callable that takes no attributes (a bound method) is wrapped."""
    if modality not in MODALITIES + (None,):
        raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
    if input not in ("pixels", "latents"):
        raise ValueError(f"input must be 'pixels' or 'latents', got {input!r}")
    try:
        fn.gg_modality, fn.gg_input = modality, input
    except AttributeError:
        return declare(_Declared(fn), modality, input)
    return fn


class _Declared:
    """A callable that cannot carry attributes (a bound method), wrapped so that it can."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def modality_of(fn):
    return getattr(fn, "gg_modality", None)


def wants_latents(fn) -> bool:
    return getattr(fn, "gg_input", "pixels") == "latents"


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images, prompts, metadata, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kB of each image (at ``quality``)."""
    from PIL import Image

    sizes = []
    for arr in _uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images, prompts, metadata):
    """flow_grpo's: minus the JPEG size in kB, divided by 500."""
    return -jpeg_size_kb(images, prompts, metadata) / 500.0


def jpeg_incompressibility(images, prompts, metadata):
    return jpeg_size_kb(images, prompts, metadata)


def brightness(images, prompts, metadata):
    """Mean pixel value in [0, 1]."""
    return images.float().mean(dim=(1, 2, 3))


def contrast(images, prompts, metadata):
    """Standard deviation of the grayscale pixels."""
    return images.float().mean(dim=1).flatten(1).std(dim=1)


def _features(out) -> torch.Tensor:
    """Projected embeddings from ``get_image_features`` / ``get_text_features``: a tensor in transformers 4, an
    output object whose ``pooler_output`` holds the projection in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScore:
    """Cosine similarity of CLIP image and text embeddings (times ``scale``), from a local checkpoint path (or a
    hub id that transformers may download). PickScore is the same computation with the PickScore model
    (``logit_scale`` as the scale). ``device``: where the CLIP model runs (default: the images' device)."""

    def __init__(self, model_path: str, processor_path: str = "", scale: float = 1.0, use_logit_scale: bool = False,
                 device: str = ""):
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.model = CLIPModel.from_pretrained(model_path).eval().requires_grad_(False)
        self.scale, self.use_logit_scale = float(scale), use_logit_scale
        self._device = device
        self.max_length = min(77, self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        dev = torch.device(self._device) if self._device else images.device
        if next(self.model.parameters()).device != dev:
            self.model.to(dev)
        inputs = self.processor(images=list(_uint8(images)), text=list(prompts), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(dev)
        img = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        scale = self.model.logit_scale.exp() if self.use_logit_scale else self.scale
        return (scale * (img * txt).sum(-1)).float().to(images.device)


def pickscore(model_path: str, processor_path: str = "", **kw):
    """PickScore (yuvalkirstain/PickScore_v1 from a local path; processor: the CLIP-H processor) / 26, as in
    flow_grpo, so the typical range is ~0.8-0.95."""
    score = ClipScore(model_path, processor_path, use_logit_scale=True, **kw)
    return lambda images, prompts, metadata: score(images, prompts, metadata) / 26.0


for _fn in (jpeg_size_kb, jpeg_compressibility, jpeg_incompressibility, brightness, contrast):
    declare(_fn, "image")
ClipScore.gg_modality, ClipScore.gg_input = "image", "pixels"


def _pickscore(**kw):
    return declare(pickscore(**kw), "image")


BUILTINS: Dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": lambda: jpeg_compressibility,
    "jpeg_incompressibility": lambda: jpeg_incompressibility,
    "brightness": lambda: brightness,
    "contrast": lambda: contrast,
    "clip_score": ClipScore,
    "pickscore": _pickscore,
}


@dataclass
class Reward:
    """A named reward callable with its weight in the proxy sum."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def resolve(name: str, kwargs: dict = None) -> RewardFn:
    """A built-in name, or ``"module:attr"``: a reward callable, or a factory called with ``kwargs``."""
    kwargs = dict(kwargs or {})
    if name in BUILTINS:
        return BUILTINS[name](**kwargs)
    if ":" not in name:
        raise RewardError(f"unknown reward {name!r}: use one of {sorted(BUILTINS)} or 'package.module:callable'")
    mod_name, attr = name.split(":", 1)
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"cannot import reward {name!r}: {exc}") from exc
    return obj(**kwargs) if kwargs else obj


def from_specs(specs) -> List[Reward]:
    """:class:`Reward` objects from config ``RewardSpec`` entries. A reward that cannot be built (missing weights
    path, bad kwargs, failing factory) raises :class:`RewardError` naming it."""
    out = []
    for s in specs:
        try:
            fn = resolve(s.name, s.kwargs)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {s.name!r} (kwargs {dict(s.kwargs)}) could not be built: "
                              f"{type(exc).__name__}: {exc}") from exc
        out.append(Reward(s.label or s.name, fn, float(s.weight)))
    return out


def mismatch(where: str, name: str, declared: str, modality: str) -> str:
    """The message for a reward of ``declared`` modality on a model of ``modality``."""
    if declared == "image":
        hint = (f"wrap it to score frames: {{name: per_frame, kwargs: {{reward: {name}, reduction: mean}}}} "
                "(configs/README.md, Video)")
    else:
        hint = "video rewards need a video model (model.family: wan)"
    return f"{where} {name!r} scores {declared}s but the model makes {modality}s; {hint}"


def check_modality(rewards: Sequence[Reward], modality: str, kind: str = "proxy") -> None:
    """Refuse a reward that declares another modality than the model's ("image" / "video"), naming its config
    entry ``rewards.<kind>[i]``: an image reward on a video model must be wrapped by ``per_frame``."""
    for i, r in enumerate(rewards):
        declared = modality_of(r.fn)
        if declared is not None and declared != modality:
            raise RewardError(mismatch(f"rewards.{kind}[{i}]", r.name, declared, modality))


def needs_pixels(rewards: Sequence[Reward]) -> bool:
    """Whether some reward reads decoded pixels (else the VAE decode can be skipped)."""
    return any(not wants_latents(r.fn) for r in rewards)


def needs_latents(rewards: Sequence[Reward]) -> bool:
    """Whether some reward reads the final latents."""
    return any(wants_latents(r.fn) for r in rewards)


def reserved(name: str) -> bool:
    """Names a reward cannot have in the metrics: reward/proxy_* is the weighted sum, and a '/' nests names."""
    return name == "proxy" or "/" in name


def evaluate(rewards: Sequence[Reward], images: Optional[torch.Tensor], prompts: Sequence[str],
             metadata: Sequence[dict], latents: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Every reward on the batch: name -> (B,) float32, checked (shape, finiteness) with clear errors. ``images``:
    the decoded images / frames (may be None when no reward needs pixels); ``latents``: the final latents for
    rewards declared with ``input="latents"``."""
    B = len(prompts)
    out = {}
    for r in rewards:
        if r.name in out:  # values are keyed by name: a second reward of that name would replace the first
            raise RewardError(f"two rewards are named {r.name!r}; proxy and gold rewards need distinct names")
        if reserved(r.name):
            raise RewardError(f"reward name {r.name!r} is reserved ('proxy', or a '/'); rename it")
        x = latents if wants_latents(r.fn) else images
        if x is None:
            raise RewardError(f"reward {r.name!r} reads {'latents' if wants_latents(r.fn) else 'pixels'}, which "
                              "this call did not provide")
        try:
            val = r.fn(x, list(prompts), list(metadata))
        except Exception as exc:
            raise RewardError(f"reward {r.name!r} raised {type(exc).__name__}: {exc} (batch prompts: "
                              f"{list(prompts)})") from exc
        val = torch.as_tensor(val, dtype=torch.float32).to(x.device).reshape(-1) \
            if not isinstance(val, torch.Tensor) else val.detach().float().reshape(-1)
        if val.numel() != B:
            hint = ""
            if x.dim() == 5 and not wants_latents(r.fn) and val.numel() == B * x.shape[1]:
                hint = (f" -- {x.shape[1]} per video, one per frame: reduce over the frames, or wrap an image reward "
                        "with per_frame")
            raise RewardError(f"reward {r.name!r} returned {val.numel()} values for a batch of {B} "
                              f"(prompts: {list(prompts)}); it must return a tensor of shape ({B},){hint}")
        bad = (~torch.isfinite(val)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward {r.name!r} returned a non-finite value {val[bad[0]].item()} for prompt "
                              f"{prompts[bad[0]]!r} (sample {bad[0]} of the batch)")
        out[r.name] = val.to(x.device)
    return out


def weighted_sum(values: Dict[str, torch.Tensor], rewards: Sequence[Reward]) -> torch.Tensor:
    """The proxy reward: sum of weight * value over ``rewards``."""
    return sum(r.weight * values[r.name] for r in rewards)


from . import video_rewards as _video  # noqa: E402 (registers the video built-ins; it imports this module lazily)

BUILTIN_MODALITY = {name: "image" for name in BUILTINS}  # what config.validate checks before anything is built
BUILTINS.update(_video.BUILTINS)
BUILTIN_MODALITY.update({name: "video" for name in _video.BUILTINS})
