"""What the benchmarks share: the SPEC §7 shapes and the input builders (a real rollout, a policy change of a given
log-ratio), the provider-availability checks, torch.compile with room for a whole run, and dtype names.

The shapes and builders are the ones the tests use (tests/_cases.py; tests/test_bench.py checks that the two agree),
kept here so that the installed package runs the suite without the repository.
Schedules follow SPEC §1: SD3.5-M as trained by Flow-GRPO = FlowMatchEulerDiscreteScheduler(shift=3), 10 steps.
"""
from __future__ import annotations

import torch

from grpo_guard import reference as ref

# SPEC §7 reference shapes: name -> (latent shape per sample, typical micro-batch)
SHAPES = {
    "sd35_512": ((16, 64, 64), 9),
    "sd35_1024": ((16, 128, 128), 4),
    "flux_1024": ((4096, 64), 4),
    "wan_480p": ((16, 21, 60, 104), 2),
}

#: small shapes for CPU runs (name -> (latent shape per sample, batch))
CPU_SHAPES = {"cpu_small": ((16, 32, 32), 2)}
ALL_SHAPES = {**CPU_SHAPES, **SHAPES}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def sd35_sigmas(steps: int = 10, shift: float = 3.0, train_timesteps: int = 1000):
    """The sigma schedule diffusers' FlowMatchEulerDiscreteScheduler(shift) gives for ``steps`` steps,
    ending with 0 (the shift is applied to the training grid, then again to the inference linspace)."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = shifted(1.0 / train_timesteps)
    lin = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    return [shifted(float(s)) for s in lin] + [0.0]


def latents(B, latent_shape, dtype=torch.float32, device="cpu", generator=None):
    """(v, x) like a denoising step: x ~ N(0, 1) latents, v ~ N(0, 1) velocities."""
    shape = (B, *latent_shape)
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return v, x


def rollout_case(B, latent_shape, sigma, sigma_next, *, dtype=torch.float32, dynamics="flow", noise_level=0.7,
                 device="cpu", generator=None):
    """A rollout in float64 (the oracle), rounded to ``dtype``: returns dict(v_old, x, x_next)."""
    v, x = latents(B, latent_shape, dtype, device, generator)
    coef = ref.step_coefficients(sigma, sigma_next, noise_level, dynamics)
    mu = ref.transition_mean(v, x, coef, torch.float64)
    z = torch.randn(mu.shape, generator=generator, dtype=torch.float64).to(device)
    x_next = (mu + coef.std.to(device).reshape(-1, 1) * z).reshape(x.shape).to(dtype)
    return {"v_old": v, "x": x, "x_next": x_next}


def perturb_for_log_ratio(v_old, x, x_next, sigma, sigma_next, target, *, dynamics="flow", noise_level=0.7,
                          generator=None):
    """A new velocity v = v_old + dv whose RatioNorm log-ratio mean_D[z*b*dv] is about ``target`` per sample,
    with dv a random direction (not aligned with z) scaled to hit the target. Returns v in v_old's dtype."""
    B = x.shape[0]
    coef = ref.step_coefficients(sigma, sigma_next, noise_level, dynamics)
    mu_old = ref.transition_mean(v_old, x, coef, torch.float64)
    z = (x_next.reshape(B, -1).double() - mu_old) / coef.std.reshape(-1, 1).to(mu_old.device)
    direction = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device)
    direction = direction + 0.05 * z  # a realistic change correlates a little with the sampled noise
    per = (z * direction).mean(dim=1) * coef.b.reshape(-1).to(z.device)
    dv = direction * (torch.as_tensor(target, dtype=torch.float64) / per).reshape(-1, 1)
    return (v_old.double() + dv.reshape(v_old.shape)).to(v_old.dtype)


def parse_list(value, choices, what):
    """'a,b' -> ['a', 'b'] checked against ``choices`` (None or 'all' -> every choice)."""
    if value is None or value == "all":
        return list(choices)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(choices)}")
    return items


def element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def compute_size(dtype) -> int:
    """Bytes per element of the compute dtype grpo_guard returns (float32, float64 for float64 inputs)."""
    return 8 if dtype == torch.float64 else 4


def compiled(fn):
    """torch.compile of ``fn`` with room for one graph per shape/dtype/grad mode of a whole run (dynamo's
    default cache limit of 8 would silently fall back to eager after 8 recompilations)."""
    import torch._dynamo as dynamo
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
    return torch.compile(fn, dynamic=False)


def compile_unavailable(device):
    """None if torch.compile can be used on ``device``, else why not."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile unavailable: {exc}"
    return None


def backend_unavailable(name):
    """An ``available`` callable for a grpo_guard backend: None, or the backend's own reason."""
    def check(device):
        from grpo_guard import dispatch
        if name == "triton" and device.type == "cpu":
            return "the Triton interpreter on CPU is a debugging tool, not a benchmark"
        return dispatch.unsupported_reason(name, device)
    return check
