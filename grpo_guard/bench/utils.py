"""What the benchmarks share: the timing/CSV/table utilities (from grpo_guard.bench, so ``grpo-guard bench`` runs
the same code), the SPEC §7 shapes and input builders (from tests/_cases.py), and dtype names."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from _cases import SHAPES, latents, perturb_for_log_ratio, rollout_case, sd35_sigmas  # noqa: E402
from grpo_guard.bench import (MODES, QUANTILES, Provider, Row, Skip, copy_bandwidth, environment,  # noqa: E402,F401
                              format_table, measure, peak_extra_memory, quantiles, run_op, speedups,
                              synchronize, write_csv)

#: small shapes for CPU runs (name -> (latent shape per sample, batch)); SPEC §7's come from tests/_cases.SHAPES
CPU_SHAPES = {"cpu_small": ((16, 32, 32), 2)}
ALL_SHAPES = {**CPU_SHAPES, **SHAPES}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


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
