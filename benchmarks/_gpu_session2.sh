# one-off: the default (single-launch, FUSED_BLOCK_MAX 2048) on the op tests that exercise it, then its timings
export PYTHONUNBUFFERED=1
GRPO_GUARD_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 110 python3 -m pytest -q -n 12 -p no:cacheprovider --timeout 100 -rf --tb=short tests/test_no_sync.py tests/test_triton_kernels.py tests/test_cuda_graphs.py tests/test_oracle.py tests/test_sde_step.py tests/test_policy_loss.py -k "not cuda-cuda" > /tmp/t3.log 2>&1
echo "pytest $?"; grep -E "^(FAILED|ERROR)|^E  " /tmp/t3.log | cut -c1-300 | head -20; tail -2 /tmp/t3.log; tail -c 40000 /tmp/t3.log > $OUT/t3.log
timeout 60 python3 benchmarks/run_gpu.py --providers gg-triton --shapes sd35_512,flux_1024,wan_480p --dtypes bf16 --modes forward,full,rollout --rep 50 --out $OUT/ab_default.csv 2>&1 | grep -E "copy bandwidth|^(op|sde_step|policy_loss) "
