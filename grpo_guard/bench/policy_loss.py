"""Benchmark of ``grpo_guard.policy_loss(method="guard")`` (SPEC §4-5) against the published GRPO-Guard loss.

The inputs are a real rollout (x' = mu_old + s*z at sigma 0.707 of the SD3.5 schedule) and a policy change whose
RatioNorm log-ratio is about 1e-6 per sample (inside the 2e-6 clip range, so gradients are not all zero).
Every provider gets the same tensors: the velocity v (requires grad), the rollout velocity v_old, x, x' and the
advantages; the published loss computes log p under theta and under the old policy (no grad) from them, as the
published training script does with its "old" adapter.

Minimal bytes (N = B*D, E = input element size): forward reads v, v_old, x, x': 4NE; backward reads v_old, x, x'
(the gradient is proportional to z = (x' - mu_old)/s) and writes dL/dv: 4NE; full = 8NE.

    python -m grpo_guard.bench.policy_loss [--device cuda] [--shapes sd35_512,wan_480p] [--out loss.csv]
    python benchmarks/bench_policy_loss.py ...     # the same, from a checkout
"""
from __future__ import annotations

import sys

import torch

import grpo_guard as gg

from . import baselines
from .timing import Provider
from .utils import (ALL_SHAPES, backend_unavailable, compile_unavailable, element_size, perturb_for_log_ratio,
                    rollout_case, sd35_sigmas)

OP = "policy_loss"
MODES = ("forward", "backward", "full")
NOISE_LEVEL, CLIP_RANGE, ADV_CLIP_MAX = 0.7, 2e-6, 5.0
STEP = 5
TARGET_LOG_RATIO = 1e-6


def make_case(shape_name, dtype, device, seed=0):
    latent_shape, B = ALL_SHAPES[shape_name]
    sig, nxt = sd35_sigmas()[STEP], sd35_sigmas()[STEP + 1]
    g = torch.Generator().manual_seed(seed)
    c = rollout_case(B, latent_shape, sig, nxt, dtype=dtype, device=device, generator=g)
    v = perturb_for_log_ratio(c["v_old"], c["x"], c["x_next"], sig, nxt, TARGET_LOG_RATIO, generator=g)
    v = v.detach().requires_grad_(True)
    return {
        "shape": shape_name, "batch": B, "latent_numel": c["x"][0].numel(), "dtype": dtype,
        "v": v, "v_old": c["v_old"], "x": c["x"], "x_next": c["x_next"], "leaf": v, "grad_out": None,
        "advantages": torch.randn(B, generator=g).to(device),
        "sigma32": torch.full((B,), sig, dtype=torch.float32, device=device),
        "sigma_next32": torch.full((B,), nxt, dtype=torch.float32, device=device),
        "sigma": torch.full((B,), sig, dtype=torch.float64, device=device),
        "sigma_next": torch.full((B,), nxt, dtype=torch.float64, device=device),
    }


def bytes_moved(case, mode):
    N = case["batch"] * case["latent_numel"]
    E = element_size(case["dtype"])
    return {"forward": 4 * N * E, "backward": 4 * N * E, "full": 8 * N * E}[mode]


def _published(fn):
    def forward(c):
        return fn(c["v"], c["v_old"], c["x"], c["x_next"], c["sigma32"], c["sigma_next32"], c["advantages"],
                  NOISE_LEVEL, CLIP_RANGE, ADV_CLIP_MAX)
    return forward


def _ours(c):
    loss, _ = gg.policy_loss(c["v"], c["x"], c["x_next"], c["sigma"], c["sigma_next"], c["advantages"],
                             old_model_output=c["v_old"], noise_level=NOISE_LEVEL, method="guard",
                             clip_range=CLIP_RANGE, adv_clip_max=ADV_CLIP_MAX)  # default validation: no sync
    return loss


def providers():
    out = [Provider("eager", _published(baselines.published_guard_loss))]

    def compiled_fwd(c):
        return _published(baselines.compiled_baseline("guard_loss"))(c)
    out.append(Provider("compile", compiled_fwd, available=compile_unavailable))
    for name in ("torch", "triton", "cuda"):
        out.append(Provider(f"gg-{name}", _ours, available=backend_unavailable(name),
                            context=(lambda n=name: gg.backend(n))))
    return out


def main(argv=None) -> int:
    """The suite's command line (:func:`grpo_guard.bench.suite.cli`) for this op only."""
    from .suite import cli
    return cli(["--ops", OP] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
