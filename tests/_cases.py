"""Input builders shared by the tests (not a test module): the benchmark suite's own (grpo_guard/bench/utils.py),
so that tests and benchmarks build the same inputs from one definition.

Schedules follow SPEC §1: SD3.5-M as trained by Flow-GRPO = FlowMatchEulerDiscreteScheduler(shift=3), 10 steps.
"""
from grpo_guard.bench.utils import SHAPES, latents, perturb_for_log_ratio, rollout_case, sd35_sigmas  # noqa: F401
