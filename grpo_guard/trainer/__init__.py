"""The thin trainer: Flow-GRPO / GRPO-Guard on diffusers SD3 / Flux / Wan (video) with accelerate (see :mod:`.loop`)."""
from .config import Config, ConfigError, from_dict, load
from .loop import NonFiniteLossError, Trainer
from .rewards import Reward, RewardError

__all__ = ["Config", "ConfigError", "from_dict", "load", "Trainer", "NonFiniteLossError", "Reward", "RewardError"]
