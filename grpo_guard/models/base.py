"""The adapter interface the trainer uses, and :func:`build_adapter` (hub pipeline or tiny random one)."""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterConfigError(ValueError):
    """The model config asks for something this pipeline cannot do (a frame count or size its VAE cannot take, a
    two-expert Wan 2.2); the message names the config key. The trainer reports it as a ConfigError."""


class Cond(dict):
    """Prompt conditioning of a batch: a dict of tensors whose first dim is the batch (plus shared tensors
    listed in ``shared``, e.g. Flux's txt_ids). Detached; stored with the rollout and reused by the update
    so the recomputed velocity sees exactly the rollout's inputs."""

    shared: Tuple[str, ...] = ()


class FlowAdapter:
    """A diffusers pipeline seen by the trainer. Subclasses set ``family`` and implement the methods below.

    ``pipe`` is the diffusers pipeline (its text encoders, tokenizers, VAE and scheduler are used as is);
    ``transformer`` is the model that is trained (LoRA is added to it by the trainer).
    """

    family = ""
    default_max_sequence_length = 256
    input_projection = ""  # the transformer's first layer on the latents (subclasses), see model_input()
    modality = "image"  # what decode() returns: "image" (B, 3, H, W) or "video" (B, F, H, W, 3), in [0, 1]
    # dtype of the velocity (after CFG) that velocity() returns; None = the transformer output's. The trainer sets
    # its compute dtype (bf16 under bf16 autocast or with bf16 weights): the model's output holds values of that
    # dtype (accelerate upcasts them to float32 under autocast), so the cast is exact, the CFG combination is
    # computed in it (as diffusers' pipelines do) and the rollout stores the velocity in its fewest bytes.
    velocity_dtype: Optional[torch.dtype] = None

    def __init__(self, pipe, resolution: int, max_sequence_length: int = 256):
        self.pipe = pipe
        self.resolution = int(resolution)
        self.max_sequence_length = int(max_sequence_length)
        for module in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")):
            if module is not None:
                module.requires_grad_(False).eval()
        self.transformer.eval()

    @classmethod
    def from_model_config(cls, pipe, m) -> "FlowAdapter":
        """The adapter of ``pipe`` for a :class:`~grpo_guard.trainer.config.ModelConfig` ``m``
        (``m.max_sequence_length`` None: the family's ``default_max_sequence_length``)."""
        return cls(pipe, resolution=m.resolution, max_sequence_length=m.max_sequence_length or
                   cls.default_max_sequence_length)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel: the VAE's downscale factor, 1 without a VAE (pixel-space models)."""
        return self.pipe.vae_scale_factor if getattr(self.pipe, "vae", None) is not None else 1

    def to(self, device) -> "FlowAdapter":
        self.pipe.to(device)
        self.__dict__.pop("_negative", None)  # cached negative-prompt embeddings (sd3) live on the old device
        return self

    # --- what subclasses implement ------------------------------------------------------------------
    def configure(self, sample, lockstep: bool = False) -> None:
        """Take the sampling options it needs from a :class:`~grpo_guard.trainer.config.SampleConfig` and check
        them against the loaded pipeline (raise :class:`AdapterConfigError` naming the key). ``lockstep``: every
        process must run the same modules at the same time (FSDP2, DeepSpeed). Default: nothing."""

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "") -> Cond:
        """Prompt embeddings of a batch (and, for CFG, of ``negative_prompt``), detached."""
        raise NotImplementedError

    def latent_shape(self) -> Tuple[int, ...]:
        """Shape of one sample's latent as the transformer sees it (SD3: C,H,W; Flux: packed seq, C*4)."""
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> List[float]:
        """The pipeline scheduler's N+1 sigmas, from 1 down to 0 (SD3: shift; Flux: dynamic shift mu)."""
        raise NotImplementedError

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, sigma: float, cond: Cond,
                 guidance_scale: float, cfg: bool = True) -> torch.Tensor:
        """The velocity v(x, sigma | prompt) that sde_step consumes, after CFG (SD3) / with guidance (Flux)."""
        raise NotImplementedError

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the dtype of the transformer's input projection (``input_projection``), as the pipelines cast
        them: float32 latents (``model.latent_dtype``) then reach a bf16 model without autocast (under autocast the
        cast is the one the projection would make)."""
        return latents.to(self.transformer.get_submodule(self.input_projection).weight.dtype)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE expects them (B, C, H, W)."""
        return latents

    # --- shared -----------------------------------------------------------------------------------------
    def _scheduler(self):
        return copy.deepcopy(self.pipe.scheduler)  # set_timesteps mutates; keep the pipeline's untouched

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images (B, 3, H, W) float32 in [0, 1]. Without a VAE (``pipe.vae is None``, e.g. a
        pixel-space toy model) the latents' first 3 channels (or 1, repeated) are the image in [-1, 1]."""
        x = self.unpack(latents)
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            img = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        else:
            cfg = vae.config
            x = x.to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = vae.decode(x, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


def to_dtype(obj, dtype: torch.dtype, model: Optional[torch.nn.Module] = None):
    """Cast ``obj`` (a pipeline built in float32, or a model) to ``dtype`` as ``from_pretrained(torch_dtype=dtype)``
    loads it: the ``_keep_in_fp32_modules`` of ``model`` (default: ``obj.transformer`` and ``obj.transformer_2``;
    Wan: rope, time embedder, norms, modulation tables) stay float32. Returns ``obj``."""
    models = [model] if model is not None else \
        [m for m in (getattr(obj, n, None) for n in ("transformer", "transformer_2")) if m is not None] or [obj]
    saved = []
    for m in models:
        keep = getattr(m, "_keep_in_fp32_modules", None) or []
        tensors = dict(m.named_parameters())
        tensors.update(m.named_buffers())
        saved += [(tensors[n], t.detach().clone()) for n, t in tensors.items() if any(k in n.split(".") for k in keep)]
    obj.to(dtype=dtype)
    for t, kept in saved:
        t.data = kept.to(t.device)
    return obj


def family_module(family: str):
    """The adapter module of a model family: ``sd3``, ``flux`` or ``wan``."""
    from . import flux, sd3, wan

    return {"sd3": sd3, "flux": flux, "wan": wan}[family]


def build_adapter(model_cfg, device: Optional[torch.device] = None, seed: int = 0) -> FlowAdapter:
    """An adapter from a :class:`~grpo_guard.trainer.config.ModelConfig`: ``tiny`` builds a random tiny pipeline
    in memory (no download), otherwise ``pretrained`` is loaded with ``from_pretrained`` in ``dtype``."""
    module = family_module(model_cfg.family)
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.tiny:
        options = getattr(module, "tiny_options", lambda m: {})(model_cfg)  # (Wan: a second expert)
        pipe = module.tiny_pipeline(seed=seed, dtype=dtype, **options)
    else:
        if hasattr(module, "check_experts"):  # Wan 2.2 A14B needs model.expert: checked before the weights load
            try:
                index = module.PIPELINE.load_config(model_cfg.pretrained)
            except Exception:  # noqa: BLE001 - from_pretrained below reports an unreachable / wrong path itself
                index = {}
            module.check_experts(index, model_cfg.expert, f"model.pretrained={model_cfg.pretrained!r}")
        pipe = module.PIPELINE.from_pretrained(model_cfg.pretrained, torch_dtype=dtype)
    # flow_grpo's precision: float16 text encoders, a float32 VAE (model_cfg.text_encoder_dtype / vae_dtype)
    for names, key in ((("text_encoder", "text_encoder_2", "text_encoder_3"), "text_encoder_dtype"),
                       (("vae",), "vae_dtype")):
        want = getattr(model_cfg, key, None)
        for module_ in (getattr(pipe, n, None) for n in names):
            if want is not None and module_ is not None:
                module_.to(dtype=DTYPES[want])
    adapter = module.Adapter.from_model_config(pipe, model_cfg)
    return adapter.to(device) if device is not None else adapter
