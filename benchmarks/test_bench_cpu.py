"""pytest-benchmark entry for what runs on a CPU: grpo_guard's torch backend vs the published eager formulas at a
small shape (forward, and forward + backward), and the time of the float32 precision comparison (printed).

    pytest benchmarks/test_bench_cpu.py --benchmark-only

Timing only: not collected by the default ``pytest`` run (testpaths = tests); the precision table's assertions
are tests/test_precision_table.py. One torch thread: on a shared CPU, multi-threaded reductions stall on OpenMP
barriers and the timings measure the neighbours.
"""
import pytest
import torch

import grpo_guard as gg

from grpo_guard.bench import policy_loss as bench_policy_loss
from grpo_guard.bench import sde_step as bench_sde_step
from grpo_guard.bench.precision import format_precision, precision_table
from grpo_guard.bench.timing import mode_callables

SHAPE = "cpu_small"
PROVIDERS = ("eager", "gg-torch")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _provider(module, name):
    return next(p for p in module.providers() if p.name == name)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("module", [bench_sde_step, bench_policy_loss], ids=["sde_step", "policy_loss"])
def test_op(benchmark, module, provider, dtype, mode):
    benchmark.group = f"{module.OP} {mode} {SHAPE} {str(dtype).replace('torch.', '')}"
    case = module.make_case(SHAPE, dtype, "cpu")
    p = _provider(module, provider)
    with p.context():
        fn, before = mode_callables(p, case, mode)

        def call():
            if before is not None:
                before()
            return fn()
        benchmark.pedantic(call, rounds=30, iterations=1, warmup_rounds=3)
    if provider.startswith("gg-"):
        assert gg.last_backend() == "torch"


def test_precision_published_vs_closed_form(benchmark, capsys):
    """Times one evaluation of the precision table (SD3.5 512 px shape, log r_hat = 2e-6) and prints it (its
    assertions: tests/test_precision_table.py)."""
    rows = benchmark.pedantic(precision_table, args=("sd35_512", (2e-6,)), rounds=1, iterations=1)
    with capsys.disabled():
        print("\n" + format_precision(rows))
