"""Trainer configuration: typed dataclasses, loaded from YAML, with ``--set a.b=value`` overrides.

Every default below is the published Flow-GRPO / GRPO-Guard recipe for SD3.5-M (SPEC §4-5, flow_grpo's
``config/grpo.py``) unless its comment says otherwise. Unknown keys and values of the wrong type are errors
(:class:`ConfigError`), never ignored: a typo must not silently train with a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be trained: unknown key, wrong type, or inconsistent values."""


class UnsupportedDistributedError(ConfigError, NotImplementedError):
    """The accelerate launch config asks for a distributed mode (or option) this trainer does not implement."""


@dataclass
class LoraConfig:
    rank: int = 32                      # flow_grpo SD3: r=32, alpha=64, gaussian init
    alpha: int = 64
    # None = the family's default (models.sd3.LORA_TARGETS / models.flux.LORA_TARGETS)
    target_modules: Optional[List[str]] = None


@dataclass
class ModelConfig:
    family: str = "sd3"                 # "sd3", "flux" (images) or "wan" (video: Wan 2.1 T2V, Wan 2.2 TI2V-5B)
    pretrained: Optional[str] = None    # hub id or local path of the diffusers pipeline
    tiny: bool = False                  # build a random tiny pipeline in memory (offline, CPU) instead
    dtype: str = "bfloat16"             # dtype of the frozen weights: float32 | bfloat16 | float16
    resolution: int = 512               # image side in pixels (wan: the default of height and width)
    height: Optional[int] = None        # wan: frame height in pixels (multiple of 16; None = resolution)
    width: Optional[int] = None         # wan: frame width in pixels (multiple of 16; None = resolution)
    num_frames: Optional[int] = None    # wan: frames per video, 4k + 1 (None = 81, WanPipeline's); images: unset
    expert: Optional[str] = None        # wan 2.2 A14B (two experts): what is trained: both, or high (transformer,
                                        # timesteps >= boundary_ratio x 1000) or low (transformer_2) with the other
                                        # frozen; tiny: true builds a two-expert tiny pipeline when set
    flow_shift: Optional[float] = None  # wan: the schedule's shift (None = the pipeline scheduler's: 3.0 for the
                                        # 480p checkpoints; Wan recommends 5.0 at 720p)
    use_lora: bool = True               # False = full fine-tuning of the transformer
    lora: LoraConfig = field(default_factory=LoraConfig)
    latent_dtype: Optional[str] = None  # dtype of the rollout's latents; None = dtype (flow_grpo: float32)
    vae_dtype: Optional[str] = None     # dtype of the VAE (decode); None = dtype (flow_grpo: float32)
    text_encoder_dtype: Optional[str] = None  # dtype of the text encoders; None = dtype (flow_grpo: float16)
    max_sequence_length: Optional[int] = None  # T5 tokens; None = the family's: SD3 128 (flow_grpo's SD3 scripts
                                               # encode at 128; SD3 attends to the padding), Flux 512 (FluxPipeline)


@dataclass
class SampleConfig:
    num_steps: int = 10                 # denoising steps of a rollout
    guidance_scale: float = 4.5         # SD3: CFG weight; Flux: the guidance-embedding value (3.5)
    guidance_scale_2: Optional[float] = None  # wan 2.2 A14B: CFG weight of the low-noise expert's steps (None =
                                              # guidance_scale, as WanPipeline)
    negative_prompt: str = ""           # SD3 CFG's unconditional prompt
    noise_level: float = 0.7            # eta
    dynamics: str = "flow"              # flow | dance | cps
    group_size: int = 24                # images per prompt (a GRPO group); groups may span processes. 1: advantages
                                        # normalized over the whole batch (flow_grpo's fallback), not per group
    batch_size: int = 9                 # images per rollout micro-batch, per process
    num_batches: int = 4                # rollout micro-batches per step, per process
    timestep_fraction: float = 0.99     # train the first int(N * fraction) steps (no SDE window)
    sde_window_size: int = 0            # > 0: SDE only on k consecutive steps (Flow-GRPO-Fast), ODE elsewhere
    sde_window_range: List[int] = field(default_factory=lambda: [0, 5])  # [lo, hi): every window lies inside it
                                        # (start drawn uniformly in [lo, hi - k], both ends included, as flow_grpo)
    sde_window_per: str = "micro_batch"  # micro_batch: a window per rollout micro-batch and process (flow_grpo);
                                         # step: one window per step shared by every process and micro-batch
    same_noise_per_group: bool = False  # all images of a group start from the same initial noise
    global_std: bool = True             # advantages: whole-batch std instead of the group's (flow_grpo base: True;
                                        # its GRPO-Guard recipes: False)


@dataclass
class TrainConfig:
    method: str = "guard"               # grpo | mean_revised | ratio_norm | guard | dppo (Flow-DPPO, SPEC §9)
    clip_range: float = 2e-6            # GRPO-Guard: 2e-6 (OCR/GenEval), 4e-6 (PickScore); Flow-GRPO: 1e-4
    adv_clip_max: float = 5.0           # advantages clamped to +-this (Flow-DPPO's official code does not clamp: .inf)
    kl_threshold: float = 1e-5          # dppo: mask a sample whose exact per-step KL is >= this and that moves away
    guard_weight: str = "dt"            # dt | beta_dt (reweighting, SPEC §5)
    cfg: bool = True                    # recompute the velocity with CFG in the update (as in the rollout)
    updates_per_step: int = 2           # optimizer steps per rollout (flow_grpo: 2); only the first is on-policy
    drop_zero_advantages: bool = True   # train only samples whose advantage is not 0 (flow_grpo); the loss is the
                                        # mean over the kept samples of each optimizer step
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    warmup_steps: int = 0               # linear LR warmup (optimizer steps), then constant
    max_grad_norm: float = 1.0
    beta_kl: float = 0.0                # KL to the reference (LoRA disabled / frozen copy); Guard: 0
    ema: bool = False                   # keep an EMA of the trained weights (saved; used by evaluate() and
                                        # written by export_lora, as flow_grpo saves its EMA)
    ema_decay: float = 0.9              # at optimizer step n the decay is min((1 + n) / (10 + n), ema_decay)
    ema_update_interval: int = 8        # update the EMA after every k-th optimizer step (flow_grpo: 8)
    timestep_grad_norms: bool = True    # log each trained timestep's own gradient norm (keeps one float32
                                        # copy of the trained parameters' gradients)
    max_nonfinite_in_a_row: int = 3     # skipped (non-finite) updates in a row before the run stops
    find_unused_parameters: bool = False
    gradient_checkpointing: bool = False  # recompute each transformer block's activations in the update's backward
                                          # (diffusers' enable_gradient_checkpointing): less memory, one more
                                          # forward per block; the rollout (no grad) is unchanged


@dataclass
class RewardSpec:
    name: str = ""                      # a built-in (rewards.BUILTINS) or "package.module:callable"
    weight: float = 1.0                 # proxy rewards: weight in the optimized sum; gold: ignored
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the built-in / factory
    label: str = ""                     # the reward's key in metrics and logs; "" = name (set it to use a reward
                                        # twice, e.g. two per_frame wrappers)


@dataclass
class RewardsConfig:
    proxy: List[RewardSpec] = field(default_factory=list)  # optimized (weighted sum)
    gold: List[RewardSpec] = field(default_factory=list)   # logged only, never optimized


@dataclass
class DataConfig:
    prompts: List[str] = field(default_factory=list)  # inline prompts, or:
    prompt_file: Optional[str] = None   # .txt (one per line) or .jsonl ({"prompt": ..., other = metadata})
    eval_prompts: List[str] = field(default_factory=list)  # for run.eval_every; empty = the first training prompts


@dataclass
class RunConfig:
    output_dir: str = "runs/grpo_guard"
    num_steps: int = 1000               # training steps (one rollout + its updates each)
    seed: int = 42
    save_every: int = 60                # checkpoint every k steps (and at the end); 0 = only at the end
    keep_last: int = 5                  # checkpoints kept
    eval_every: int = 0                 # every k steps: ODE samples of data.eval_prompts (EMA weights if
                                        # train.ema), all rewards logged as eval/...; 0 = never
    eval_num_steps: int = 0             # denoising steps for evaluation; 0 = sample.num_steps (flow_grpo: 40)
    eval_media: int = 4                 # each evaluation saves its first k samples (process 0's) as an image strip
                                        # <output_dir>/eval/step-XXXXXXXX.png (video: a row of 8 frames per sample,
                                        # and an animated .gif); 0 = none
    mixed_precision: str = "bf16"       # no | bf16 | fp16 (accelerate's autocast; fp16 adds its loss scaler on a GPU
                                        # and autocasts to float16 on a CPU; single process or DDP-style only)
    cpu: bool = False                   # force the CPU (accelerate's cpu=True; also for 2-process CPU tests)
    tensorboard: bool = True
    progress: bool = True               # tqdm progress bar


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.family": ("sd3", "flux", "wan"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "sample.dynamics": ("flow", "dance", "cps"),
    "train.method": ("grpo", "mean_revised", "ratio_norm", "guard", "dppo"),
    "sample.sde_window_per": ("micro_batch", "step"),
    "train.guard_weight": ("dt", "beta_dt"),
    "run.mixed_precision": ("no", "bf16", "fp16"),
}


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats), building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if value is False and "no" in CHOICES.get(path, ()):  # YAML 1.1 reads an unquoted no (or off) as false
            return "no"
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value  # typing.Any


def _build(cls, data: Dict[str, Any], path: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "top level"
        raise ConfigError(f"unknown config key(s) {', '.join(f'{path}.{k}'.lstrip('.') for k in unknown)} "
                          f"({where} accepts: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides) -> Dict[str, Any]:
    """``["train.method=grpo", "sample.num_steps=4"]`` -> a nested dict; values are parsed as YAML."""
    tree: Dict[str, Any] = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.method=grpo), got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: Optional[Dict[str, Any]], overrides=None) -> Config:
    """Build and validate a :class:`Config` from a nested dict plus ``--set`` style overrides."""
    data = _merge(data or {}, parse_overrides(overrides))
    cfg = _build(Config, data)
    validate(cfg)  # the batch/group divisibility is checked by the Trainer, which knows the process count
    return cfg


def load(path: str, overrides=None) -> Config:
    """Read a YAML config file (see ``configs/``) and apply overrides."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _get(cfg: Config, dotted: str):
    node = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Value checks that types cannot express; with ``world_size`` also the group/batch divisibility."""
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key} must be one of {options}, got {_get(cfg, key)!r}")
    m, s, t = cfg.model, cfg.sample, cfg.train
    for key in ("latent_dtype", "vae_dtype", "text_encoder_dtype"):
        val = getattr(m, key)
        if val is not None and val not in CHOICES["model.dtype"]:
            raise ConfigError(f"model.{key} must be one of {CHOICES['model.dtype']} or null (= model.dtype), "
                              f"got {val!r}")
    if (m.pretrained is None) == (not m.tiny):
        raise ConfigError("set exactly one of model.pretrained (hub id / path) and model.tiny: true")
    positive = {"model.resolution": m.resolution, "sample.num_steps": s.num_steps, "sample.group_size": s.group_size,
                "sample.batch_size": s.batch_size, "sample.num_batches": s.num_batches,
                "train.updates_per_step": t.updates_per_step, "train.clip_range": t.clip_range,
                "train.adv_clip_max": t.adv_clip_max, "train.max_grad_norm": t.max_grad_norm,
                "train.learning_rate": t.learning_rate, "model.lora.rank": m.lora.rank,
                "train.max_nonfinite_in_a_row": t.max_nonfinite_in_a_row, "run.num_steps": cfg.run.num_steps,
                "train.ema_update_interval": t.ema_update_interval, "train.kl_threshold": t.kl_threshold}
    for key in ("max_sequence_length", "height", "width", "num_frames", "flow_shift"):
        if getattr(m, key) is not None:
            positive[f"model.{key}"] = getattr(m, key)
    for key, val in positive.items():
        if not val > 0:
            raise ConfigError(f"{key} must be > 0, got {val}")
    if t.kl_threshold == float("inf"):
        raise ConfigError(f"train.kl_threshold must be finite, got {t.kl_threshold}")
    if m.flow_shift == float("inf"):
        raise ConfigError(f"model.flow_shift must be finite, got {m.flow_shift}")
    if not 0 < t.clip_range < 1:
        raise ConfigError(f"train.clip_range must be in (0, 1), got {t.clip_range}")
    if not 0 < s.noise_level <= (1 if s.dynamics == "cps" else 10):
        raise ConfigError(f"sample.noise_level must be > 0 (<= 1 for cps), got {s.noise_level}")
    if min(t.beta_kl, t.warmup_steps, cfg.run.save_every, cfg.run.eval_every, cfg.run.eval_num_steps,
           cfg.run.eval_media) < 0 or not 0 <= t.ema_decay < 1:
        raise ConfigError("train.beta_kl, train.warmup_steps, run.save_every, run.eval_every, run.eval_num_steps, "
                          "run.eval_media must be >= 0 and train.ema_decay in [0, 1)")
    if not 0 <= cfg.run.seed < 2 ** 32:
        raise ConfigError(f"run.seed must be in [0, 2**32) (it seeds torch, python and numpy), got {cfg.run.seed}")
    if s.sde_window_size > 0:
        lo, hi = (s.sde_window_range + [None, None])[:2]
        if len(s.sde_window_range) != 2 or not 0 <= lo or hi - lo < s.sde_window_size or hi > s.num_steps - 1:
            raise ConfigError(f"sample.sde_window_range {s.sde_window_range} must be [lo, hi) with 0 <= lo, "
                              f"hi - lo >= sample.sde_window_size ({s.sde_window_size}: the window lies inside the "
                              f"range) and hi <= {s.num_steps - 1} (the last step, sigma -> 0, is never trained)")
    elif int(s.num_steps * s.timestep_fraction) < 1 or s.timestep_fraction > 1:
        raise ConfigError(f"sample.timestep_fraction={s.timestep_fraction} trains int({s.num_steps} * fraction) = "
                          f"{int(s.num_steps * s.timestep_fraction)} steps; it must be >= 1 and fraction <= 1")
    per_step = s.batch_size * s.num_batches * (world_size or 1)
    if world_size is not None and per_step % s.group_size:
        raise ConfigError(f"images per step = sample.batch_size * sample.num_batches * processes = {s.batch_size} * "
                          f"{s.num_batches} * {world_size} = {per_step} must be a multiple of sample.group_size "
                          f"({s.group_size})")
    if s.num_batches % t.updates_per_step:
        raise ConfigError(f"sample.num_batches ({s.num_batches}) must be a multiple of train.updates_per_step "
                          f"({t.updates_per_step}): each update takes an equal share of the rollout micro-batches")
    _check_video_keys(m)
    if s.guidance_scale_2 is not None and m.family != "wan":
        raise ConfigError("sample.guidance_scale_2 is the low-noise expert's CFG weight of Wan 2.2 A14B "
                          f"(model.family: wan); family {m.family!r} has no second expert: remove it")
    if not cfg.rewards.proxy:
        raise ConfigError("rewards.proxy is empty: list at least one reward to optimize")
    from .rewards import BUILTIN_MODALITY, mismatch, reserved

    modality = "video" if m.family in VIDEO_FAMILIES else "image"
    seen = {}
    for kind in ("proxy", "gold"):
        for i, spec in enumerate(getattr(cfg.rewards, kind)):
            if not spec.name:
                raise ConfigError(f"rewards.{kind}[{i}].name is empty")
            key = spec.label or spec.name
            if reserved(key):
                raise ConfigError(f"rewards.{kind}[{i}] is keyed {key!r} in the metrics: 'proxy' and names with '/' "
                                  "are reserved; set rewards.<kind>[i].label")
            if spec.name in BUILTIN_MODALITY and BUILTIN_MODALITY[spec.name] != modality:
                raise ConfigError(mismatch(f"rewards.{kind}[{i}]", spec.name, BUILTIN_MODALITY[spec.name], modality))
            if key in seen:  # results are keyed by label (or name): a duplicate would overwrite another
                raise ConfigError(f"rewards.{kind}[{i}] {key!r} is already used by {seen[key]}; give every proxy and "
                                  "gold reward a distinct label (rewards.<kind>[i].label, default: its name)")
            seen[key] = f"rewards.{kind}[{i}]"
    if not t.cfg and cfg.model.family in ("sd3", "wan") and s.guidance_scale > 1.0:
        raise ConfigError(f"train.cfg=false but sample.guidance_scale={s.guidance_scale} > 1: the rollout velocity "
                          "uses classifier-free guidance, so the update must too (or sample with guidance_scale 1)")
    if not cfg.data.prompts and not cfg.data.prompt_file:
        raise ConfigError("no prompts: set data.prompts (a list) or data.prompt_file")


VIDEO_FAMILIES = ("wan",)


def _check_video_keys(m: ModelConfig) -> None:
    """Video keys only on a video family; frame count and frame size that Wan's VAE and patch size take (the
    adapter checks them again against the loaded VAE, e.g. Wan 2.2's factor 16)."""
    video_keys = [k for k in ("num_frames", "height", "width", "flow_shift", "expert") if getattr(m, k) is not None]
    if m.family not in VIDEO_FAMILIES:
        if video_keys:
            raise ConfigError(f"model.{video_keys[0]} is a video key (model.family: wan); model.family "
                              f"{m.family!r} makes images of side model.resolution: remove it")
        return
    if m.expert not in (None, "high", "low", "both"):
        raise ConfigError(f"model.expert must be high, low, both or null, got {m.expert!r}")
    if m.num_frames is not None and (m.num_frames - 1) % 4:
        raise ConfigError(f"model.num_frames={m.num_frames}: Wan's VAE needs 4k + 1 frames (e.g. 33 or 81)")
    for key in ("height", "width"):
        side, name = (getattr(m, key), f"model.{key}") if getattr(m, key) is not None else (m.resolution,
                                                                                             "model.resolution")
        if side % 16:
            raise ConfigError(f"{name}={side}: Wan's frames must be a multiple of 16 pixels (VAE factor 8 x patch "
                              f"2), e.g. {max(16, side // 16 * 16)}")


def trained_steps(s: SampleConfig, window_start: Optional[int] = None) -> List[int]:
    """Indices of the trained (SDE) denoising steps: the first int(N * timestep_fraction), or the SDE window."""
    if s.sde_window_size > 0:
        if window_start is None:
            raise ValueError("an SDE window needs its start")
        return list(range(window_start, window_start + s.sde_window_size))
    return list(range(int(s.num_steps * s.timestep_fraction)))
