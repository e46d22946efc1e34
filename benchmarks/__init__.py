"""The benchmarks' results (RESULTS.md, CSVs) and thin scripts that run the suite shipped in the package,
:mod:`grpo_guard.bench` (``grpo-guard bench``); the commands in RESULTS.md and gpu_check.sh run from a checkout."""
