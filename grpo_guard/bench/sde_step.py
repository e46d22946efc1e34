"""Benchmark of ``grpo_guard.sde_step`` (SPEC §2) against Flow-GRPO's eager step.

Modes: "forward" / "backward" / "full" score a stored x' (training: log-prob and mean, gradient of the log-prob
w.r.t. the velocity); "rollout" samples x' (no grad, noise given so no provider times a random generator).
Providers: eager (published formula), compile (torch.compile of it), gg-torch / gg-triton / gg-cuda (grpo_guard's
backends, each skipped with its reason where unavailable).

Minimal bytes (N = B*D latent elements, E = input element size, C = 4, the float32 compute dtype; the (B,)
vectors are counted too but are negligible): forward reads v, x, x' and writes the mean: 3NE + NC; backward reads
v, x, x' and writes dL/dv: 4NE (recomputing the mean; reading a saved float32 mean instead is no cheaper);
full = forward + backward; rollout reads v, x and the float32 noise and writes x' (and log p): 3NE + NC. The
rollout is the step of a sampling loop, which keeps x' and log p: grpo_guard runs it with ``return_mean=False``
and the baselines return (x' in the latents' dtype, log p) only, so torch.compile drops the mean too.

    python -m grpo_guard.bench.sde_step [--device cuda] [--shapes sd35_512,wan_480p] [--out sde.csv]
    python benchmarks/bench_sde_step.py ...     # the same, from a checkout
"""
from __future__ import annotations

import sys

import torch

import grpo_guard as gg

from . import baselines
from .timing import Provider
from .utils import (ALL_SHAPES, backend_unavailable, compile_unavailable, compute_size, element_size, rollout_case,
                    sd35_sigmas)

OP = "sde_step"
MODES = ("forward", "backward", "full", "rollout")
NOISE_LEVEL = 0.7
STEP = 5  # sigma 0.707 -> 0.602 of the SD3.5 10-step schedule


def make_case(shape_name, dtype, device, seed=0):
    latent_shape, B = ALL_SHAPES[shape_name]
    sig, nxt = sd35_sigmas()[STEP], sd35_sigmas()[STEP + 1]
    g = torch.Generator().manual_seed(seed)
    c = rollout_case(B, latent_shape, sig, nxt, dtype=dtype, device=device, generator=g)
    v = c["v_old"].clone().requires_grad_(True)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    noise = torch.randn(c["x"].shape, generator=g).to(device=device, dtype=cd)
    D = c["x"][0].numel()
    return {
        "shape": shape_name, "batch": B, "latent_numel": D, "dtype": dtype,
        "v": v, "x": c["x"], "x_next": c["x_next"], "noise": noise, "leaf": v,
        "grad_out": torch.randn(B, generator=g).to(device=device, dtype=cd),
        # Flow-GRPO reads float32 sigmas from the scheduler; grpo_guard takes float64 (B,) tensors (no host sync)
        "sigma32": torch.full((B,), sig, dtype=torch.float32, device=device),
        "sigma_next32": torch.full((B,), nxt, dtype=torch.float32, device=device),
        "sigma": torch.full((B,), sig, dtype=torch.float64, device=device),
        "sigma_next": torch.full((B,), nxt, dtype=torch.float64, device=device),
    }


def bytes_moved(case, mode):
    N, B = case["batch"] * case["latent_numel"], case["batch"]
    E, C = element_size(case["dtype"]), compute_size(case["dtype"])
    fwd = 3 * N * E + N * C + B * C
    bwd = 4 * N * E + B * C
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd, "rollout": 3 * N * E + N * C + B * C}[mode]


def _published(fn, rollout_fn):
    def forward(c):
        return fn(c["v"], c["x"], c["sigma32"], c["sigma_next32"], NOISE_LEVEL, prev_sample=c["x_next"])[1]

    def rollout(c):
        return rollout_fn(c["v"], c["x"], c["sigma32"], c["sigma_next32"], NOISE_LEVEL, noise=c["noise"])
    return forward, rollout


def _ours(c):  # the default validation (device-side checks, no host sync): what a training loop runs
    return gg.sde_step(c["v"], c["x"], c["sigma"], c["sigma_next"], NOISE_LEVEL, prev_sample=c["x_next"]).log_prob


def _ours_rollout(c):
    return gg.sde_step(c["v"], c["x"], c["sigma"], c["sigma_next"], NOISE_LEVEL, noise=c["noise"], return_mean=False)


def providers():
    eager_fwd, eager_roll = _published(baselines.published_sde_step, baselines.published_rollout_step)
    out = [Provider("eager", eager_fwd, rollout=eager_roll)]

    def compiled_fwd(c):
        return _published(baselines.compiled_baseline("sde_step"), None)[0](c)

    def compiled_roll(c):
        return _published(None, baselines.compiled_baseline("rollout_step"))[1](c)
    out.append(Provider("compile", compiled_fwd, available=compile_unavailable, rollout=compiled_roll))
    for name in ("torch", "triton", "cuda"):
        out.append(Provider(f"gg-{name}", _ours, available=backend_unavailable(name),
                            context=(lambda n=name: gg.backend(n)), rollout=_ours_rollout))
    return out


def main(argv=None) -> int:
    """The suite's command line (:func:`grpo_guard.bench.suite.cli`) for this op only."""
    from .suite import cli
    return cli(["--ops", OP] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
