"""grpo_guard's benchmark suite, shipped with the package: ``grpo-guard bench`` runs it from any installation.

Modules (the Liger-Kernel layout: shared measurement code, one module per op, tools beside them):

- :mod:`.timing`: measurement (median and 20/80th percentiles, L2 flush, CUDA-graph GPU time, host time), copy
  bandwidth, peak memory, one op x several providers (:func:`run_op`), tables and CSV.
- :mod:`.utils`: the SPEC §7 shapes, the input builders, dtype names, provider-availability checks.
- :mod:`.baselines`: the published eager formulas (Flow-GRPO's SDE step, the published GRPO-Guard loss).
- :mod:`.sde_step`, :mod:`.policy_loss`: one op each (cases, bytes moved, providers); :mod:`.suite` runs them.
- :mod:`.cli`: ``grpo-guard bench`` (machine-aware defaults; ``grpo-guard bench TOOL`` for the tools below).
- :mod:`.host_overhead`, :mod:`.precision`, :mod:`.tune_triton`, :mod:`.trainer`: the other measurements.

Each module with a command line runs as ``python -m grpo_guard.bench.<module>``; a checkout's ``benchmarks/``
folder keeps thin scripts that call these modules, and the results files.
The timing API is re-exported here (``from grpo_guard.bench import measure, graph_time, Provider``).
"""
from .timing import (MODES, QUANTILES, Provider, Row, Skip, compare_table, copy_bandwidth, environment,  # noqa: F401
                     format_row, format_table, graph_time, host_time, markdown_table, measure, mode_callables,
                     peak_extra_memory, quantiles, read_csv, run_op, speedups, synchronize, write_csv)


def main(argv=None) -> int:
    """``grpo-guard bench`` (:func:`grpo_guard.bench.cli.main`)."""
    from .cli import main as _main
    return _main(argv)
