"""Wan 2.1 text-to-video (``WanPipeline``: ``WanTransformer3DModel``, ``AutoencoderKLWan``, a UMT5 text encoder)
and Wan 2.2 TI2V-5B used as text-to-video.

- Prompts: the pipeline's ``encode_prompt`` (UMT5, ``max_sequence_length`` tokens, 512 as in the pipeline and
  flow_grpo), cast to the dtype of the transformer's text projection as the pipeline casts them; the negative
  prompt is encoded once per adapter and expanded (a view).
- CFG as the pipeline does it: a conditional and an unconditional forward (not a doubled batch, so the velocity
  equals ``pipe(...)``'s bit for bit), ``v = v_u + g (v_c - v_u)``; with ``guidance_scale <= 1`` one forward.
- Latents ``(B, C, F', H/s, W/s)``: ``F' = (num_frames - 1) / 4 + 1`` latent frames, ``s`` the VAE's spatial factor
  (8; 16 for Wan 2.2's VAE).
- Schedule: the pipeline scheduler's flow sigmas and its timesteps. Wan's hub checkpoints ship a
  ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` and ``flow_shift`` (3.0 for 480p, 5.0 for 720p): its sigma
  grid ``shift(linspace(1, 1/1000, N+1)[:-1])`` then 0, and its int64 timesteps ``int(1000 sigma)``, are used as
  they are (the rollout steps them with ``sde_step`` / Euler, not with UniPC's multistep update). A
  ``FlowMatchEulerDiscreteScheduler`` works too (its float timesteps ``1000 sigma``). ``flow_shift`` replaces the
  scheduler's shift.
- Wan 2.2 TI2V-5B (``expand_timesteps``): the timestep is given per latent token, as the pipeline does.
- Wan 2.2 A14B (two experts: ``transformer`` for timesteps ``t >= boundary_ratio * 1000``, ``transformer_2``
  below, with ``guidance_scale_2``), ``model.expert``: ``high`` or ``low`` trains that expert (it is
  :attr:`Adapter.transformer`) while the other is frozen and samples its own steps (rollout and evaluation), so every
  trained step must lie on the trained expert's side (:meth:`Adapter.configure` checks the config); ``both`` trains
  the two as one module (:class:`Experts`), each step routed to its expert.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch

from . import tiny
from .base import AdapterConfigError, Cond, FlowAdapter, to_dtype

try:
    from diffusers import WanPipeline as PIPELINE
except ImportError:  # pragma: no cover - the train extra is missing
    PIPELINE = None

MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens of a prompt (WanPipeline's and flow_grpo's)
NUM_FRAMES = 81            # WanPipeline's default

# self-attention, cross-attention and the FFN of every block (Flow-Factory's Wan default; flow_grpo's Wan recipe
# hits the attention projections only)
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2"]

EXPERTS = ("high", "low", "both")


class Experts(torch.nn.Module):
    """Wan 2.2 A14B's two experts trained together (``model.expert: both``): ``high`` (the pipeline's
    ``transformer``) and ``low`` (``transformer_2``) as one module, so that accelerate prepares one model (DDP,
    FSDP2, DeepSpeed), one optimizer holds both LoRA sets (or weights) and one checkpoint both.
    ``forward(..., expert="high" | "low")`` runs one expert; the diffusers / peft methods the trainer calls apply
    to both."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module):
        super().__init__()
        self.high, self.low = high, low

    def forward(self, *args, expert: str, **kwargs):
        return (self.high if expert == "high" else self.low)(*args, **kwargs)

    def add_adapter(self, config, adapter_name: str = "default"):
        self.high.add_adapter(config, adapter_name)
        self.low.add_adapter(copy.deepcopy(config), adapter_name)

    def enable_gradient_checkpointing(self):
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        return self.high.gradient_checkpointing and self.low.gradient_checkpointing

    def disable_adapters(self):
        self.high.disable_adapters()
        self.low.disable_adapters()

    def enable_adapters(self):
        self.high.enable_adapters()
        self.low.enable_adapters()

    @property
    def peft_config(self):
        return self.high.peft_config


def has_two_experts(config: dict) -> bool:
    """Whether a ``model_index.json`` / pipeline config is Wan 2.2 A14B's: ``transformer_2`` set (a second expert
    for the steps below ``boundary_ratio``)."""
    expert2 = config.get("transformer_2")
    return expert2 is not None and not (isinstance(expert2, (list, tuple)) and expert2[0] is None)


def check_experts(config: dict, expert: Optional[str], where: str) -> None:
    """``model.expert`` is set exactly for a two-expert pipeline (from its ``model_index.json`` before any weights
    load, or from the built pipeline)."""
    if expert is not None and expert not in EXPERTS:
        raise AdapterConfigError(f"model.expert must be one of {EXPERTS} or null, got {expert!r}")
    if has_two_experts(config) and expert is None:
        raise AdapterConfigError(
            f"{where} has two experts (Wan 2.2 A14B: transformer for the steps with timestep >= boundary_ratio x "
            "1000, transformer_2 below): set model.expert to both (train the two, each on its own steps), or to "
            "the one to train, high (transformer) or low (transformer_2), while the other stays frozen and samples "
            "its own steps (every trained step must then be the trained expert's)")
    if not has_two_experts(config) and expert is not None:
        raise AdapterConfigError(f"model.expert={expert!r} is for two-expert pipelines (Wan 2.2 A14B); {where} "
                                 "has one transformer: remove it")


class WanCond(Cond):
    """prompt_embeds (B, L, C) and the negative prompt's (B, L, C), an expanded view of one encoding."""


class Adapter(FlowAdapter):
    family = "wan"
    default_max_sequence_length = MAX_SEQUENCE_LENGTH
    modality = "video"

    def __init__(self, pipe, resolution: int = 480, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: int = NUM_FRAMES,
                 flow_shift: Optional[float] = None, expert: Optional[str] = None):
        self.expert = expert
        self.two_experts = getattr(pipe, "transformer_2", None) is not None
        self._experts = Experts(pipe.transformer, pipe.transformer_2) if expert == "both" else None
        check_experts({"transformer_2": getattr(pipe, "transformer_2", None)}, expert, "the pipeline")
        if self.two_experts and pipe.config.get("boundary_ratio") is None:
            raise AdapterConfigError("the pipeline has transformer_2 but no boundary_ratio: which expert samples "
                                     "which step is undefined")
        super().__init__(pipe, resolution, max_sequence_length)
        self.guidance_scale_2: Optional[float] = None  # the low-noise expert's CFG weight (configure())
        if self.frozen_expert is not None:
            self.frozen_expert.requires_grad_(False).eval()
        if self.two_experts:
            self.boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        self.height = int(height or resolution)
        self.width = int(width or resolution)
        self.num_frames = int(num_frames)
        self.flow_shift = flow_shift
        self._timesteps = {}  # sigma -> the scheduler's timestep for it (filled by sigmas())
        self.check_shape()

    @classmethod
    def from_model_config(cls, pipe, m) -> "Adapter":
        return cls(pipe, resolution=m.resolution,
                   max_sequence_length=m.max_sequence_length or cls.default_max_sequence_length,
                   height=m.height, width=m.width, num_frames=m.num_frames or NUM_FRAMES, flow_shift=m.flow_shift,
                   expert=m.expert)

    # --- experts (Wan 2.2 A14B) -----------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        """The trained transformer: the pipeline's, or with two experts ``model.expert``'s (both: :class:`Experts`)."""
        if self._experts is not None:
            return self._experts
        return self.pipe.transformer_2 if self.expert == "low" else self.pipe.transformer

    @property
    def frozen_expert(self) -> Optional[torch.nn.Module]:
        """The expert that is not trained (two-expert pipelines trained on one expert only)."""
        if not self.two_experts or self.expert == "both":
            return None
        return self.pipe.transformer if self.expert == "low" else self.pipe.transformer_2

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.pipe.transformer.patch_embedding.weight.dtype)  # (both experts have one dtype)

    def experts_vary(self, sample) -> bool:
        """Whether, with ``model.expert: both``, the same trained position of two micro-batches (or processes) can
        belong to different experts: SDE windows drawn per micro-batch over a range that spans the boundary. Under
        FSDP2 / DeepSpeed every process must then run the same expert at the same time (collectives): refused."""
        if self.expert != "both" or sample.sde_window_size <= 0 or sample.sde_window_per == "step":
            return False
        sig = self.sigmas(sample.num_steps)
        lo, hi = sample.sde_window_range
        starts = range(lo, hi - sample.sde_window_size + 1)
        return any(len({self.expert_at(sig[s + p]) for s in starts}) > 1 for p in range(sample.sde_window_size))

    def expert_at(self, sigma: float) -> Optional[str]:
        """Which expert the pipeline runs at ``sigma``: "high" if its timestep >= boundary_ratio x 1000, else
        "low" (None with one transformer)."""
        if not self.two_experts:
            return None
        return "high" if self._timestep_value(sigma)[0] >= self.boundary else "low"

    def configure(self, sample, lockstep: bool = False) -> None:
        """Sampling options of a :class:`~grpo_guard.trainer.config.SampleConfig`: ``guidance_scale_2`` (the
        low-noise expert's CFG weight; null = guidance_scale, as the pipeline), and with two experts, that every
        step that can be trained (the first ``int(N * timestep_fraction)``, or all of ``sde_window_range``) is one
        of the trained expert's; with ``both`` under ``lockstep`` (FSDP2, DeepSpeed), that every process runs the same
        expert at the same time (:meth:`experts_vary`)."""
        self.guidance_scale_2 = sample.guidance_scale_2
        if lockstep and self.experts_vary(sample):
            raise AdapterConfigError(
                f"model.expert: both with sample.sde_window_per: micro_batch and sample.sde_window_range "
                f"{sample.sde_window_range} across the expert boundary: under FSDP2 / DeepSpeed every process must run "
                "the same expert at the same time; set sample.sde_window_per: step, or a window range inside one "
                "expert's steps")
        if not self.two_experts or self.expert == "both":
            return
        sig = self.sigmas(sample.num_steps)
        if sample.sde_window_size > 0:
            steps, key = range(*sample.sde_window_range), f"sample.sde_window_range {sample.sde_window_range}"
        else:
            n = int(sample.num_steps * sample.timestep_fraction)
            steps, key = range(n), f"sample.timestep_fraction {sample.timestep_fraction} (steps 0-{n - 1})"
        mine = [j for j in range(sample.num_steps) if self.expert_at(sig[j]) == self.expert]
        bad = [j for j in steps if j not in mine]
        if bad:
            raise AdapterConfigError(
                f"{key} includes step(s) {bad} of the {'low' if self.expert == 'high' else 'high'}-noise expert, "
                f"which is frozen (model.expert: {self.expert}); the {self.expert}-noise expert samples steps "
                f"{mine[0]}-{mine[-1]} of {sample.num_steps} (boundary_ratio {self.pipe.config.boundary_ratio}): "
                "train inside them, e.g. with sample.sde_window_size and sde_window_range"
                if mine else f"model.expert {self.expert} samples none of the {sample.num_steps} steps")

    # --- shapes -------------------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    @property
    def temporal_scale(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def check_shape(self) -> None:
        """The frame count and the resolution this VAE and patch size take (the pipeline would round them)."""
        ft, patch = self.temporal_scale, self.pipe.transformer.config.patch_size
        if self.num_frames < 1 or (self.num_frames - 1) % ft:
            raise AdapterConfigError(f"model.num_frames={self.num_frames}: this VAE needs num_frames = {ft}k + 1 "
                                     f"(e.g. {ft * 8 + 1} or {ft * 20 + 1})")
        for key, side, p in (("height", self.height, patch[1]), ("width", self.width, patch[2])):
            mult = self.latent_scale * p
            if side <= 0 or side % mult:
                raise AdapterConfigError(f"model.{key}={side}: must be a positive multiple of {mult} (VAE factor "
                                         f"{self.latent_scale} x patch {p}); e.g. {max(mult, side // mult * mult)}")

    def latent_shape(self) -> Tuple[int, ...]:
        s = self.latent_scale
        frames = (self.num_frames - 1) // self.temporal_scale + 1
        return (self.pipe.transformer.config.in_channels, frames, self.height // s, self.width // s)

    # --- prompts ------------------------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            pe, _ = self.pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        # the pipeline casts the embeddings to the transformer's dtype; its text projection is what reads them
        return pe.to(self.pipe.transformer.condition_embedder.text_embedder.linear_1.weight.dtype)

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "") -> WanCond:
        cache = self.__dict__.setdefault("_negative", {})
        if negative_prompt not in cache:
            cache[negative_prompt] = self._encode([negative_prompt])
        ne = cache[negative_prompt]
        pe = self._encode(prompts)
        return WanCond(prompt_embeds=pe, neg_prompt_embeds=ne.expand(len(prompts), *ne.shape[1:]))

    # --- schedule -----------------------------------------------------------------------------------------
    def _flow_scheduler(self):
        sched = copy.deepcopy(self.pipe.scheduler)  # set_timesteps mutates; keep the pipeline's untouched
        c = sched.config
        if "flow_shift" in c:  # UniPC / DPM-Solver multistep: only with flow sigmas is it a flow-matching grid
            if not c.get("use_flow_sigmas", False) or c.get("use_dynamic_shifting", False):
                raise AdapterConfigError(f"the pipeline's {type(sched).__name__} does not use flow sigmas "
                                         "(use_flow_sigmas: false, or a dynamic shift): its grid is not a "
                                         "flow-matching one")
            if self.flow_shift is not None:
                sched = type(sched).from_config(c, flow_shift=self.flow_shift)
        elif "shift" in c:  # FlowMatchEulerDiscreteScheduler
            if c.get("use_dynamic_shifting", False):
                raise AdapterConfigError("the pipeline's FlowMatchEulerDiscreteScheduler uses a dynamic shift, which "
                                         "Wan does not; set use_dynamic_shifting: false")
            if self.flow_shift is not None:
                sched = type(sched).from_config(c, shift=self.flow_shift)
        else:
            raise AdapterConfigError(f"the pipeline's scheduler {type(sched).__name__} has no flow-matching sigmas")
        return sched

    def sigmas(self, num_steps: int) -> List[float]:
        sched = self._flow_scheduler()
        sched.set_timesteps(num_steps, device="cpu")
        sig = [float(s) for s in sched.sigmas]
        if len(sig) != num_steps + 1 or sig[-1] != 0.0 or len(sched.timesteps) != num_steps:
            raise AdapterConfigError(f"the pipeline's {type(sched).__name__} gave {len(sig)} sigmas ending at "
                                     f"{sig[-1]} for {num_steps} steps; the trainer needs N + 1 ending at 0 "
                                     "(final_sigmas_type: zero)")
        ts = sched.timesteps  # stored as Python numbers: the timestep is filled on the device, never copied there
        self._timesteps.update((s, (t, ts.dtype)) for s, t in zip(sig, ts.tolist()))
        return sig

    def _timestep_value(self, sigma: float):
        if float(sigma) not in self._timesteps:
            raise KeyError(f"sigma {sigma} is not on a grid from this adapter's sigmas(); call sigmas(N) first")
        return self._timesteps[float(sigma)]

    def timestep(self, sigma: float, batch: int, device) -> torch.Tensor:
        """The transformer's timestep input at ``sigma``: the scheduler's own value for it (UniPC: int64
        ``int(1000 sigma)``; FlowMatchEuler: float32 ``1000 sigma``), ``(B,)``, or ``(B, tokens)`` float32 per
        latent token with ``expand_timesteps`` (Wan 2.2 TI2V-5B)."""
        value, dtype = self._timestep_value(sigma)
        if not self.pipe.config.get("expand_timesteps", False):
            return torch.full((batch,), value, dtype=dtype, device=device)
        _, f, h, w = self.latent_shape()
        p = self.pipe.transformer.config.patch_size
        tokens = (f // p[0]) * (h // p[1]) * (w // p[2])
        return torch.full((batch, tokens), value, dtype=torch.float32, device=device)

    # --- the model ----------------------------------------------------------------------------------------
    def velocity(self, model, latents, sigma, cond, guidance_scale, cfg=True):
        """``model`` (the trained transformer, possibly wrapped) at ``sigma``; with two experts, a step of the
        frozen expert runs it instead, and a low-noise step uses ``guidance_scale_2`` when set."""
        t = self.timestep(sigma, latents.shape[0], latents.device)
        expert = self.expert_at(sigma)
        route = {}
        if self.expert == "both":  # model is Experts (or a wrapper of it): it runs the step's expert
            route = {"expert": expert}
        elif expert is not None and expert != self.expert:
            model = self.frozen_expert
        if expert == "low" and self.guidance_scale_2 is not None:
            guidance_scale = self.guidance_scale_2

        hidden = self.model_input(latents)  # the pipeline's latents.to(transformer_dtype)

        def forward(embeds):
            out = model(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, return_dict=False,
                        **route)[0]
            return out if self.velocity_dtype is None else out.to(self.velocity_dtype)
        v = forward(cond["prompt_embeds"])
        if not (cfg and guidance_scale > 1.0):
            return v
        uncond = forward(cond["neg_prompt_embeds"])
        return uncond + guidance_scale * (v - uncond)

    def _latent_stats(self, device, dtype):
        """The VAE's per-channel latents_mean and latents_std as (1, C, 1, 1, 1) tensors, copied to the device once
        (a copy per decode would wait for the device)."""
        cache = self.__dict__.setdefault("_stats", {})
        key = (str(device), dtype)
        if key not in cache:
            c = self.pipe.vae.config
            cache[key] = tuple(torch.tensor(v, dtype=dtype).view(1, c.z_dim, 1, 1, 1).to(device)
                               for v in (c.latents_mean, c.latents_std))
        return cache[key]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> frames ``(B, F, H, W, 3)`` float32 in [0, 1] (the pipeline's un-normalization by the
        VAE's ``latents_mean`` / ``latents_std``, its decode and ``postprocess_video``'s mapping)."""
        vae = self.pipe.vae
        mean, std = self._latent_stats(latents.device, vae.dtype)
        x = latents.to(vae.dtype) * std + mean
        video = vae.decode(x, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)


TINY_BOUNDARY = 0.8  # tiny two-expert pipelines: at 4 steps (timesteps 999, 900, 750, 500) steps 0-1 high, 2-3 low


def tiny_options(m) -> dict:
    """tiny_pipeline's options for a model config: a second expert when ``model.expert`` is set."""
    return {"boundary_ratio": TINY_BOUNDARY} if m.expert is not None else {}


def tiny_transformer(seed: int = 0, in_channels: int = 4):
    """A random 2-block ``WanTransformer3DModel`` (2 heads of 8, text dim 32)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=32,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None, scheduler=None,
                  expand_timesteps: bool = False, boundary_ratio: Optional[float] = None):
    """A random tiny ``WanPipeline`` built in memory: a 2-block transformer, a 4-channel ``AutoencoderKLWan``
    (spatial factor 8, temporal 4), a 1-layer UMT5 encoder, and Wan's hub scheduler (UniPC with flow sigmas,
    flow_shift 3). At 32 px and 9 frames the latents are 4 x 3 x 4 x 4. ``scheduler``: another one (e.g. a
    ``FlowMatchEulerDiscreteScheduler``); ``expand_timesteps``: Wan 2.2 TI2V-5B's per-token timestep;
    ``boundary_ratio``: two experts as Wan 2.2 A14B (a second random transformer below it)."""
    from diffusers import UniPCMultistepScheduler

    transformer = transformer if transformer is not None else tiny_transformer(seed)
    scheduler = scheduler or UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0, num_train_timesteps=1000)
    experts = {}
    if boundary_ratio is not None:
        experts = dict(transformer_2=tiny_transformer(seed + 5, transformer.config.in_channels),
                       boundary_ratio=boundary_ratio)
    pipe = PIPELINE(tokenizer=tiny.t5_tokenizer(), text_encoder=tiny.umt5_text_encoder(32, seed + 2),
                    vae=tiny.wan_vae(transformer.config.in_channels, seed + 1), transformer=transformer,
                    scheduler=scheduler, expand_timesteps=expand_timesteps, **experts)
    return to_dtype(pipe, dtype)  # float32 rope / time embedder / norms, as from_pretrained keeps them
