"""Timing utilities of the benchmark suite (:mod:`grpo_guard.bench`): measurement, copy bandwidth, peak memory,
one op x several providers (:func:`run_op`), the table, the Markdown tables and the CSV.

Conventions (Liger-Kernel habits): each measurement reports the median and the 20th/80th percentiles of the
per-call times; on CUDA each call is timed with CUDA events after flushing the L2 cache, on CPU with
``time.perf_counter``. Achieved GB/s = the bytes the op must minimally move (each latent-sized input read once,
each latent-sized output written once per pass) / median time, compared with a device copy bandwidth
(``dst.copy_(src)`` of a large tensor, read + write) measured in the same run. Peak extra memory is
``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it (CUDA only).
On CUDA, :func:`graph_time` also gives the GPU's own time per call (CUDA-graph replay, host overhead removed):
at these sizes a call's wall time is mostly Python and kernel launches, which a training step hides behind
the transformer's kernels.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
MODES = ("forward", "backward", "full")


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """Writing a buffer larger than the L2 cache before each timed call, so inputs come from HBM (CUDA only)."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def measure(fn: Callable[[], object], device, *, warmup: int = 5, rep: int = 50, max_seconds: float = 10.0,
            before: Optional[Callable[[], None]] = None) -> List[float]:
    """Per-call times of ``fn`` in milliseconds (``rep`` calls after ``warmup``; fewer if they would take more
    than ``max_seconds``). ``before`` runs untimed before every call (e.g. clearing ``.grad``)."""
    device = torch.device(device)
    flush = _L2Flush(device)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    synchronize(device)
    times: List[float] = []
    deadline = time.perf_counter() + max_seconds
    if device.type == "cuda":
        events = []
        for i in range(rep):
            if before is not None:
                before()
            flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if i >= 2 and time.perf_counter() > deadline:
                break
        synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(rep):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if i >= 2 and time.perf_counter() > deadline:
                break
    return times


def graph_time(fn: Callable[[], object], device, *, rep: int = 20,
               before: Optional[Callable[[], None]] = None) -> Optional[float]:
    """GPU time of one call in milliseconds with the host's launch overhead removed: ``[L2 flush, fn]``
    captured in a CUDA graph and replayed ``rep`` times, minus a graph of the flush alone. None off CUDA.
    ``measure`` times what a caller waits for (Python, dispatch, launches); this, what the GPU works. Raises
    if ``fn`` cannot be captured (a host synchronization inside it, say)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    flush = _L2Flush(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(3):
            if before is not None:
                before()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graphs = []
    for body in ((lambda: (flush(), fn())), flush):
        if before is not None:
            before()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        graphs.append(g)
    per_call = []
    for g in graphs:
        g.replay()
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rep):
            g.replay()
        end.record()
        synchronize(device)
        per_call.append(start.elapsed_time(end) / rep)
    return max(per_call[0] - per_call[1], 0.0)


def host_time(fn: Callable[[], object], device, *, warmup: int = 3, rep: int = 50,
              before: Optional[Callable[[], None]] = None) -> float:
    """Median host time of one call in milliseconds: ``time.perf_counter`` around the Python call, no device
    synchronization inside the timed region (what a training loop's thread pays to issue the op; on a GPU the
    kernels run asynchronously, so this is Python, checks, dispatch and launches -- and any synchronization the op
    makes). The queue is drained between calls, so a call never waits for an earlier one's kernels."""
    device = torch.device(device)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(rep):
        if before is not None:
            before()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return quantiles(times)[0]


def quantiles(times: Sequence[float], qs: Sequence[float] = QUANTILES) -> List[float]:
    """Linear-interpolated quantiles (numpy's default) of ``times``."""
    xs = sorted(times)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def copy_bandwidth(device, nbytes: Optional[int] = None, rep: int = 20) -> float:
    """Achieved device copy bandwidth in GB/s (1e9 bytes/s): ``dst.copy_(src)`` moves 2*nbytes (read + write).
    Default size 1 GiB on CUDA, 64 MiB on CPU (both larger than any cache)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = measure(lambda: dst.copy_(src), device, warmup=3, rep=rep)
    median = quantiles(times, (0.5,))[0]
    del src, dst
    return 2 * nbytes / (median * 1e-3) / 1e9


def same_size_copy_time(device, nbytes: int) -> Optional[float]:
    """GPU time in milliseconds (:func:`graph_time`) of ``dst.copy_(src)`` moving ``nbytes`` in all (nbytes/2 read,
    nbytes/2 written): what a copy kernel achieves at an op's own size, launch ramp and tail included, where the
    1 GiB copy of :func:`copy_bandwidth` is the device's streaming limit. None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src = torch.ones(max(nbytes // 2, 16), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    try:
        return graph_time(lambda: dst.copy_(src), device)
    finally:
        del src, dst


def peak_extra_memory(fn: Callable[[], object], device, before: Optional[Callable[[], None]] = None) -> Optional[float]:
    """MiB allocated at the peak of one call of ``fn`` beyond what was allocated before it (CUDA), else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if before is not None:
        before()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2 ** 20


# ----------------------------------------------------------------------------------------------------------
# one op, several providers
# ----------------------------------------------------------------------------------------------------------

class Skip(Exception):
    """A provider cannot run this case; the message says why."""


@dataclass
class Provider:
    """How one implementation of an op is timed.

    name        shown in the table ("eager", "compile", "triton", ...)
    forward     case -> the tensor to differentiate (a 0-dim loss, or a (B,) log-prob), built from ``case``
    available   device -> None, or the reason it cannot run there
    context     a context manager entered around all of this provider's calls (e.g. ``grpo_guard.backend``)
    rollout     optional: case -> anything; the no-grad sampling call (sde_step only)
    """

    name: str
    forward: Callable[[dict], torch.Tensor]
    available: Callable[[torch.device], Optional[str]] = lambda device: None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    rollout: Optional[Callable[[dict], object]] = None


def mode_callables(provider: Provider, case: dict, mode: str):
    """-> (fn, before) for ``mode``: "forward" (grad-enabled forward), "backward" (backward of one forward
    output, retain_graph), "full" (forward + backward), "rollout" (no-grad sampling). ``case["leaf"]`` is the
    tensor whose .grad is cleared before each call; ``case["grad_out"]`` the upstream gradient (None: scalar)."""
    leaf, grad_out = case.get("leaf"), case.get("grad_out")

    def clear():
        if leaf is not None:
            leaf.grad = None

    if mode == "forward":
        return (lambda: provider.forward(case)), None
    if mode == "backward":
        out = provider.forward(case)
        return (lambda: out.backward(grad_out, retain_graph=True)), clear
    if mode == "full":
        return (lambda: provider.forward(case).backward(grad_out)), clear
    if mode == "rollout":
        if provider.rollout is None:
            raise Skip("no rollout path")

        def roll():
            with torch.no_grad():
                return provider.rollout(case)
        return roll, None
    raise ValueError(f"mode must be one of {MODES + ('rollout',)}, got {mode!r}")


@dataclass
class Row:
    """One measurement (one CSV line)."""

    op: str
    mode: str
    provider: str
    shape: str
    batch: int
    latent_numel: int
    dtype: str
    device: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    bytes_moved: Optional[int] = None
    gbps: Optional[float] = None
    pct_of_copy: Optional[float] = None
    peak_extra_mib: Optional[float] = None
    graph_ms: Optional[float] = None      # GPU time without host overhead (graph_time), CUDA only
    graph_gbps: Optional[float] = None
    host_ms: Optional[float] = None       # host time of one call (host_time): what the calling thread pays
    copy_graph_ms: Optional[float] = None  # GPU time of a copy moving bytes_moved (same_size_copy_time), CUDA only
    note: str = ""


def run_op(op: str, providers: Iterable[Provider], cases: Iterable[dict], modes: Sequence[str], device,
           bytes_moved: Callable[[dict, str], int], copy_gbps: Optional[float], *, warmup: int = 5, rep: int = 50,
           max_seconds: float = 10.0, log: Callable[[str], None] = lambda s: None) -> List[Row]:
    """Time every provider x case x mode. ``cases``: dicts made by the op's ``make_case`` with keys shape, batch,
    latent_numel, dtype (and the tensors). Unavailable providers give rows with the reason in ``note``."""
    device = torch.device(device)
    providers = list(providers)
    rows: List[Row] = []
    copies: Dict[int, Optional[float]] = {}  # bytes -> same_size_copy_time, once per size
    for case in cases:
        for mode in modes:
            for p in providers:
                row = Row(op, mode, p.name, case["shape"], case["batch"], case["latent_numel"],
                          str(case["dtype"]).replace("torch.", ""), str(device))
                reason = p.available(device)
                if reason:
                    row.note = f"skipped: {reason}"
                    rows.append(row)
                    continue
                try:
                    with p.context():
                        fn, before = mode_callables(p, case, mode)
                        times = measure(fn, device, warmup=warmup, rep=rep, max_seconds=max_seconds, before=before)
                        row.peak_extra_mib = peak_extra_memory(fn, device, before)
                        row.host_ms = host_time(fn, device, rep=min(rep, 50), before=before)
                        try:  # not "backward": its forward ran outside the capture, on another stream
                            if mode != "backward":
                                row.graph_ms = graph_time(fn, device, before=before)
                        except Exception as exc:  # noqa: BLE001  (not capturable: reported, not fatal)
                            row.note = f"no graph time: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                except Skip as exc:
                    row.note = f"skipped: {exc}"
                    rows.append(row)
                    continue
                except Exception as exc:  # a provider that fails is reported, not fatal to the suite
                    row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    rows.append(row)
                    log(f"{op} {mode} {p.name} {case['shape']} {row.dtype}: {row.note}")
                    continue
                row.median_ms, row.p20_ms, row.p80_ms = quantiles(times)
                row.bytes_moved = int(bytes_moved(case, mode))
                row.gbps = row.bytes_moved / (row.median_ms * 1e-3) / 1e9
                if copy_gbps:
                    row.pct_of_copy = 100.0 * row.gbps / copy_gbps
                if row.graph_ms:
                    row.graph_gbps = row.bytes_moved / (row.graph_ms * 1e-3) / 1e9
                    if row.bytes_moved not in copies:
                        copies[row.bytes_moved] = same_size_copy_time(device, row.bytes_moved)
                    row.copy_graph_ms = copies[row.bytes_moved]
                rows.append(row)
            if case.get("leaf") is not None:
                case["leaf"].grad = None
    return rows


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------

def environment(device) -> Dict[str, str]:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "\
               f"{torch.get_num_threads()} torch threads)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        triton_version = "n/a"
    return {"device": name, "torch": torch.__version__, "cuda": str(torch.version.cuda), "triton": triton_version,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def format_row(r: Row) -> str:
    if r.median_ms is None:
        return f"{r.op:<12} {r.mode:<8} {r.provider:<10} {r.shape:<10} {r.dtype:<8} {r.note}"
    return (f"{r.op:<12} {r.mode:<8} {r.provider:<10} {r.shape:<10} {r.dtype:<8} "
            f"{r.median_ms * 1e3:>10.1f} {r.p20_ms * 1e3:>10.1f} {r.p80_ms * 1e3:>10.1f} "
            f"{_fmt(r.gbps, '8.1f'):>8} {_fmt(r.pct_of_copy, '6.1f'):>6} {_fmt(r.peak_extra_mib, '9.1f'):>9} "
            f"{_fmt(None if r.graph_ms is None else r.graph_ms * 1e3, '9.1f'):>9} {_fmt(r.graph_gbps, '8.1f'):>8} "
            f"{_fmt(None if r.host_ms is None else r.host_ms * 1e3, '9.1f'):>9}")


def format_table(rows: Sequence[Row], copy_gbps: Optional[float] = None, env: Optional[dict] = None) -> str:
    lines = []
    if env:
        lines.append("  ".join(f"{k}={v}" for k, v in env.items()))
    if copy_gbps is not None:
        lines.append(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    lines.append(f"{'op':<12} {'mode':<8} {'provider':<10} {'shape':<10} {'dtype':<8} "
                 f"{'median_us':>10} {'p20_us':>10} {'p80_us':>10} {'GB/s':>8} {'%copy':>6} {'extra_MiB':>9} "
                 f"{'graph_us':>9} {'graph_GB/s':>8} {'host_us':>9}")
    lines.extend(format_row(r) for r in rows)
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row], baseline: str = "eager") -> str:
    """The rows as a Markdown table (times in microseconds), with the speedup over ``baseline``."""
    base = {(r.op, r.mode, r.shape, r.dtype): r.median_ms for r in rows
            if r.provider == baseline and r.median_ms is not None}
    out = ["| op | mode | shape | dtype | provider | median us | p20 us | p80 us | GB/s | % of copy | "
           f"vs {baseline} | peak extra MiB | GPU us (graph) | GPU GB/s | % of same-size copy | host us |",
           "|---" * 16 + "|"]
    for r in rows:
        if r.median_ms is None:
            out.append(f"| {r.op} | {r.mode} | {r.shape} | {r.dtype} | {r.provider} | {r.note} ||||||||||| ")
            continue
        b = base.get((r.op, r.mode, r.shape, r.dtype))
        out.append(f"| {r.op} | {r.mode} | {r.shape} | {r.dtype} | {r.provider} | {r.median_ms * 1e3:.1f} | "
                   f"{r.p20_ms * 1e3:.1f} | {r.p80_ms * 1e3:.1f} | {_fmt(r.gbps, '.1f')} | "
                   f"{_fmt(r.pct_of_copy, '.0f')} | {'' if not b else format(b / r.median_ms, '.2f') + 'x'} | "
                   f"{_fmt(r.peak_extra_mib, '.1f')} | "
                   f"{_fmt(None if r.graph_ms is None else r.graph_ms * 1e3, '.1f')} | {_fmt(r.graph_gbps, '.0f')} | "
                   f"{_fmt(same_size_copy_pct(r), '.0f')} | "
                   f"{_fmt(None if r.host_ms is None else r.host_ms * 1e3, '.1f')} |")
    return "\n".join(out)


def same_size_copy_pct(r: Row) -> Optional[float]:
    """100 x (GPU time of a copy moving the row's bytes) / (the row's GPU time): how close the op comes to what a
    copy kernel reaches at the same size (None without both graph times)."""
    if not (r.graph_ms and r.copy_graph_ms):
        return None
    return 100.0 * r.copy_graph_ms / r.graph_ms


def compare_table(runs: Sequence[tuple], provider: str = "gg-triton") -> str:
    """Markdown table of one provider's GPU time (CUDA-graph replay) across runs: ``runs`` is [(label, rows)];
    per (op, mode, shape, dtype) each run's us and % of its own copy bandwidth, and last / first."""
    def key(r):
        return (r.op, r.mode, r.shape, r.dtype)
    tables = [(label, {key(r): r for r in rows if r.provider == provider and r.graph_ms is not None})
              for label, rows in runs]
    head = "| op | mode | shape | dtype | " + " | ".join(f"{lb}: GPU us | {lb}: % of copy" for lb, _ in tables)
    out = [head + f" | {tables[-1][0]} / {tables[0][0]} | same-size copy: GPU us |",
           "|---" * (6 + 2 * len(tables)) + "|"]
    for k in [k for k in tables[0][1] if all(k in t for _, t in tables)]:
        cells = []
        for _, t in tables:
            r = t[k]
            # the run's copy bandwidth is gbps / (pct_of_copy / 100): the graph time's share of it
            pct = None if not (r.graph_gbps and r.gbps and r.pct_of_copy) else r.graph_gbps * r.pct_of_copy / r.gbps
            cells += [f"{r.graph_ms * 1e3:.1f}", _fmt(pct, ".0f")]
        ratio = tables[-1][1][k].graph_ms / tables[0][1][k].graph_ms
        copy_ms = next((t[k].copy_graph_ms for _, t in tables if t[k].copy_graph_ms), None)
        out.append(f"| {' | '.join(k)} | " + " | ".join(cells) + f" | {ratio:.2f} | "
                   f"{_fmt(None if copy_ms is None else copy_ms * 1e3, '.1f')} |")
    return "\n".join(out)


def passes_table(rows: Sequence[Row], copy_gbps: float, providers: Optional[Sequence[str]] = None) -> str:
    """Markdown table of each op's forward and backward pass apart, from the GPU times (CUDA-graph replay) of its
    "forward" and "full" rows: the backward is full - forward, its bytes bytes(full) - bytes(forward); GB/s and %
    of ``copy_gbps`` per pass (``providers``: only these). The forward reads its inputs after the L2 flush, the
    backward runs right after the forward, so what the forward read may still be in L2 (a backward can exceed 100 %
    of the HBM copy)."""
    def key(r):
        return (r.op, r.shape, r.dtype, r.provider)
    fwd = {key(r): r for r in rows if r.mode == "forward" and r.graph_ms}
    out = ["| op | shape | dtype | provider | forward GPU us | forward GB/s | forward % of copy | backward GPU us "
           "(full - forward) | backward GB/s | backward % of copy |", "|---" * 10 + "|"]
    for r in rows:
        f = fwd.get(key(r))
        if r.mode != "full" or not r.graph_ms or f is None or not (r.bytes_moved and f.bytes_moved) or \
                (providers is not None and r.provider not in providers):
            continue
        b_ms, b_bytes = r.graph_ms - f.graph_ms, r.bytes_moved - f.bytes_moved
        cells = []
        for ms, nbytes in ((f.graph_ms, f.bytes_moved), (b_ms, b_bytes)):
            gbps = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else None
            cells += [f"{ms * 1e3:.1f}", _fmt(gbps, ".0f"), _fmt(None if gbps is None else 100 * gbps / copy_gbps, ".0f")]
        out.append(f"| {' | '.join(key(r))} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def read_copy_gbps(path) -> Optional[float]:
    """The copy bandwidth a CSV written by :func:`write_csv` recorded (None if it has none)."""
    with Path(path).open(newline="") as fh:
        first = next(csv.DictReader(fh), None)
    return float(first["copy_gbps"]) if first and first.get("copy_gbps") else None


def read_csv(path) -> List[Row]:
    """Rows back from a CSV written by :func:`write_csv`."""
    names = {f.name: f for f in fields(Row)}
    rows = []
    with Path(path).open(newline="") as fh:
        for rec in csv.DictReader(fh):
            kw = {}
            for k, f in names.items():
                val = rec.get(k, "")
                if k in ("batch", "latent_numel"):
                    kw[k] = int(val)
                elif k in ("op", "mode", "provider", "shape", "dtype", "device", "note"):
                    kw[k] = val
                elif k == "bytes_moved":
                    kw[k] = int(val) if val else None
                else:
                    kw[k] = float(val) if val else None
            rows.append(Row(**kw))
    return rows


def speedups(rows: Sequence[Row], baseline: str = "eager") -> List[str]:
    """Lines 'op mode shape dtype: provider x{speedup vs baseline}' for every timed non-baseline provider."""
    base = {(r.op, r.mode, r.shape, r.dtype): r.median_ms for r in rows
            if r.provider == baseline and r.median_ms is not None}
    out = []
    for r in rows:
        key = (r.op, r.mode, r.shape, r.dtype)
        if r.provider != baseline and r.median_ms is not None and base.get(key):
            out.append(f"{r.op} {r.mode} {r.shape} {r.dtype}: {r.provider} {base[key] / r.median_ms:.2f}x vs "
                       f"{baseline}")
    return out


def write_csv(rows: Sequence[Row], path, env: Optional[dict] = None, copy_gbps: Optional[float] = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {("device_name" if k == "device" else k): v for k, v in (env or {}).items()}
    extra["copy_gbps"] = "" if copy_gbps is None else f"{copy_gbps:.2f}"
    names = [f.name for f in fields(Row)] + list(extra)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), **extra})
