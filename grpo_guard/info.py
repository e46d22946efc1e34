"""``grpo-guard info``: versions, devices, which backend runs where (and why not), and a self-check.

The self-check runs on every backend this machine has: a rollout with ``sde_step``, the on-policy
``policy_loss`` of every method (the ratio must be exactly 1), and an off-policy GRPO-Guard log-ratio at the
clip-range scale against a float64 evaluation (SPEC §6).
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from . import api, dispatch
from . import reference as ref


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # an optional package that is absent or broken is reported, not fatal
        return "not installed"


def self_check(name: str, device: torch.device, D: int = 4096, B: int = 4):
    """-> dict(on_policy_exact=bool, rel_err=float) for backend ``name`` on ``device``."""
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(B, D, generator=g).to(device)
    x = torch.randn(B, D, generator=g).to(device)
    with dispatch.backend(name):
        roll = api.sde_step(v_old, x, 0.6, 0.5, noise=torch.randn(B, D, generator=g).to(device))
        adv = torch.randn(B, generator=g).to(device)
        exact = True
        for method in ref.METHODS:
            _, st = api.policy_loss(v_old, x, roll.prev_sample, 0.6, 0.5, adv, method=method,
                                    old_prev_sample_mean=roll.prev_sample_mean)
            exact &= bool((st["log_ratio"] == 0).all()) and st["ratio_mean"].item() == 1.0
        v = v_old + 1e-4 * torch.randn(B, D, generator=g).to(device)
        _, st = api.policy_loss(v, x, roll.prev_sample, 0.6, 0.5, adv, method="guard", old_model_output=v_old)
    _, want = ref.policy_loss(v.double(), x.double(), roll.prev_sample.double(), 0.6, 0.5, adv.double(),
                              method="guard", old_model_output=v_old.double())
    err = ((st["log_ratio"].double() - want["log_ratio"]).abs() / want["log_ratio"].abs()).max().item()
    return {"on_policy_exact": exact, "rel_err": err, "log_ratio_scale": want["log_ratio"].abs().mean().item()}


def kernel_sets() -> str:
    """Which kernel set each fused backend runs, and the switch for the other one."""
    from .ops import cuda_backend
    try:
        from .ops import triton_launch
        triton = ("single-launch forward (GRPO_GUARD_TRITON_FUSED=0: split)" if triton_launch.FUSED
                  else "split forward (GRPO_GUARD_TRITON_FUSED=1: single-launch, the default)")
        if triton_launch.FUSED:
            triton += (", lean variant (opt-in, GRPO_GUARD_TRITON_LEAN=1)" if triton_launch.LEAN
                       else ", default variant (GRPO_GUARD_TRITON_LEAN=1: lean, opt-in until it has passed the GPU "
                       "tests)")
    except Exception as exc:  # noqa: BLE001  (no usable Triton: said, not fatal)
        triton = f"not importable ({type(exc).__name__})"
    if cuda_backend.V2:
        cuda = ("second set: vector layout, checks in the kernels, "
                + ("single-launch forwards (GRPO_GUARD_CUDA_V2_FUSED=0: two launches)" if cuda_backend.V2_FUSED
                   else "two-launch forwards (GRPO_GUARD_CUDA_V2_FUSED=1: single-launch)")
                + " (opt-in, GRPO_GUARD_CUDA_V2=1)")
    else:
        cuda = "default (GRPO_GUARD_CUDA_V2=1: the second set, opt-in until it has passed the GPU tests)"
    return f"triton {triton}; cuda {cuda}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-guard info", description=__doc__.split("\n")[0])
    parser.add_argument("--no-check", action="store_true", help="skip the self-check")
    args = parser.parse_args(argv)
    from . import __version__
    print(f"grpo_guard {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {_version('triton')}  diffusers {_version('diffusers')}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"cuda: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        print("cuda: no GPU visible")
    from .ops import cuda_backend
    print(f"cuda extension: {cuda_backend.status()}")
    print(f"requested backend: {dispatch.requested()} (GRPO_GUARD_BACKEND or grpo_guard.backend())")
    print(f"kernel sets: {kernel_sets()}")
    failed = False
    for device in devices:
        for name in dispatch.BACKENDS:
            reason = dispatch.unsupported_reason(name, device)
            if reason:
                print(f"  {device.type:4s} {name:6s} unavailable: {reason}")
                continue
            if args.no_check:
                print(f"  {device.type:4s} {name:6s} available")
                continue
            res = self_check(name, device)
            ok = res["on_policy_exact"] and res["rel_err"] <= 1e-3
            failed |= not ok
            print(f"  {device.type:4s} {name:6s} available  self-check {'ok' if ok else 'FAILED'}: on-policy ratio "
                  f"exactly 1: {res['on_policy_exact']}; guard log-ratio ~{res['log_ratio_scale']:.1e}, "
                  f"rel. error vs float64 {res['rel_err']:.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
