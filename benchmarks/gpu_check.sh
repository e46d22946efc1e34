#!/usr/bin/env bash
# The GPU checks of one short device session, most valuable first, each step time-boxed so the whole script
# ends within BUDGET seconds (default 540). Run from the repository root on a machine with an NVIDIA GPU:
#
#   OUT=/some/dir BUDGET=540 bash benchmarks/gpu_check.sh
#
# 1. install (editable, no deps; wheels in .whl/ first, e.g. diffusers, where the machine lacks them)
# 2. build the CUDA extension in place (background) while the op tests run on the GPU (triton + torch backends)
# 3. the op tests again for the cuda backend, and tests/test_cuda_backend.py
# 4. op benchmarks (eager, gg-torch, gg-triton, gg-cuda; every SPEC shape, bf16 + fp32) -> results.csv, and the
#    fused providers' forward and backward passes apart (--passes-from) -> passes.md
# 5. trainer step of an SD3.5-M-sized transformer, fused vs reference ops -> trainer.json
#    and the tiny trainer under DeepSpeed ZeRO-2 on the GPU (1 process, bf16, 2 steps + resume; needs deepspeed,
#    e.g. its wheel and pydantic's in .whl/) -> deepspeed_metrics.jsonl
# 6. Triton launch-geometry sweep (GPU time from CUDA-graph replay) -> printed
# 7. torch.compile of the published formulas at two shapes -> results_compile.csv
# 8. (ab) the Triton kernel sets side by side: split forward vs single-launch forward, GPU time -> ab_*.csv
# 9. (sweep_fused) the single-launch kernels' geometry sweep -> printed
# 10. (host) host time per call of the default call, every backend, float and tensor sigmas -> host_overhead.csv;
#     with HOST_AGAINST=<an older checkout> also that checkout vs this one in alternating rounds
#     -> host_overhead_before.csv, host_overhead_after.csv (e.g. `git worktree add .old9c 9c4614e` here, then
#     carry .old9c to the machine and set HOST_AGAINST=.old9c: issue 9's GPU host-time comparison)
# 11. (fp16) the tiny trainer with flow_grpo's precision (fp16 autocast + loss scaler) -> fp16.log
# 12. (wheel) the platform wheel built against this machine's torch (csrc/build_wheels.sh, sm_90 only to fit the
#     budget: GRPO_GUARD_CUDA_ARCHS), installed into a clean folder, and the cuda-backend tests run from it -> wheel.log
# 13. (wan) trainer step of a Wan 2.1 1.3B-sized transformer at 480p, 33 and 81 frames: s/step, videos/s, the ops'
#     share, peak memory -> trainer_wan_<frames>.json
# 14. (ab_cuda) the CUDA fallback's kernel sets side by side: the default vs the second (GRPO_GUARD_CUDA_V2=1: vector
#     layout with 16-byte accesses, a rollout without the mean, checks in the kernels, single-launch forwards), GPU
#     time -> ab_cuda_v2_*.csv, the second set with its two-launch forwards (GRPO_GUARD_CUDA_V2_FUSED=0) ->
#     ab_cuda_v2_twolaunch.csv, and host time per call -> host_overhead_cuda_v2_*.csv.
#     Its correctness on the GPU is step 3 (tests/test_cuda_backend.py and the kernel-set tests run both sets).
# 15. (ab_lean) the single-launch Triton kernels' opt-in lean variant (GRPO_GUARD_TRITON_LEAN=1: float64
#     coefficients before the loads, a 64-register cap for 16-bit latents, the hardware bf16 rounding): first the op
#     tests with it (its bit-identity test against the default, then the Triton op tests; it may become the
#     default only if they pass), then GPU time side by side -> ab_lean_*.csv, tests_lean.log.
#
# STEPS (comma-separated) picks steps by name: tests, cuda, bench, trainer, deepspeed, sweep, compile, ab,
# sweep_fused, host, fp16, wheel, wan, ab_cuda, ab_lean (default: all but ab, sweep_fused, wheel, wan, ab_cuda and
# ab_lean). GRPO_GUARD_TRITON_FUSED=0 runs everything on the
# split Triton kernels (the single-launch ones are the default since 2026-11-30). The next session should run
#   STEPS=tests,cuda,ab_cuda,ab_lean,bench,fp16,wan,wheel BUDGET=540 bash benchmarks/gpu_check.sh
# (the op tests incl. Flow-DPPO, the cuda backend's compile/opcheck tests that have not run on a GPU yet and its
# second kernel set, the two CUDA kernel sets timed, the lean Triton kernels tested and timed, the full benchmark
# table with the single-launch default, the fp16 loss-scaler trainer run, the Wan 1.3B trainer step, the wheel).
set -u
STEPS=${STEPS:-tests,cuda,bench,trainer,deepspeed,fp16,sweep,compile,host}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"; }  # min(step cap, time left)
step() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvcc --version | tail -2 | head -1

step install
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
GRPO_GUARD_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 \
  || { echo "install failed:"; tail -20 /tmp/install.log; }
python3 -c "import grpo_guard, diffusers; print('grpo_guard', grpo_guard.__file__, 'diffusers', diffusers.__version__)"

BUILD=
if want cuda; then
step "build the CUDA extension (background)"
( GRPO_GUARD_BUILD_CUDA=1 GRPO_GUARD_CUDA_ARCHS=${GRPO_GUARD_CUDA_ARCHS:-90} MAX_JOBS=4 \
    timeout "$(cap 300)" python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1
  echo "build_ext exit status $?" >> "$OUT/build_ext.log" ) &
BUILD=$!
fi

OPS_TESTS="tests/test_sde_step.py tests/test_policy_loss.py tests/test_triton_kernels.py tests/test_dispatch.py
  tests/test_validation.py tests/test_kl_to_reference.py tests/test_group_advantages.py tests/test_compat_flow_grpo.py
  tests/test_oracle.py tests/test_no_sync.py tests/test_cuda_graphs.py tests/test_compile.py tests/test_precision_table.py
  tests/test_dppo.py"
if want tests; then
step "op tests on the GPU: triton and torch backends (GRPO_GUARD_TRITON_FUSED=${GRPO_GUARD_TRITON_FUSED:-1})"
timeout "$(cap 240)" python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 120 -rfEs $OPS_TESTS -k "not cuda-cuda" \
  > "$OUT/tests.log" 2>&1
echo "pytest exit status $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -20; tail -3 "$OUT/tests.log"
fi

if want cuda; then
step "wait for the CUDA extension"
wait $BUILD
tail -3 "$OUT/build_ext.log"
step "op tests on the GPU: cuda backend"
timeout "$(cap 150)" python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 120 -rfEs tests/test_cuda_backend.py \
  $OPS_TESTS -k "cuda-cuda or test_cuda_backend or test_cuda_graphs or (test_compile and cuda)" >> "$OUT/tests.log" 2>&1
echo "pytest exit status $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -20; tail -3 "$OUT/tests.log"
fi

if want wheel; then
step "platform wheel against this machine's torch, installed in a clean folder, cuda-backend tests from it"
rm -rf /tmp/gg_wheel /tmp/gg_site
GRPO_GUARD_CUDA_ARCHS=${WHEEL_ARCHS:-90} timeout "$(cap 200)" bash csrc/build_wheels.sh /tmp/gg_wheel > "$OUT/wheel.log" 2>&1
echo "build_wheels exit status $?"; ls -l /tmp/gg_wheel 2>&1 | tail -2
WHL=$(ls /tmp/gg_wheel/grpo_guard-*-cp*.whl 2>/dev/null | head -1)
if [ -n "$WHL" ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/gg_site "$WHL" >> "$OUT/wheel.log" 2>&1
  (cd /tmp && PYTHONPATH=/tmp/gg_site python3 -m grpo_guard.cli info) 2>&1 | tee -a "$OUT/wheel.log" | head -12
  # the tests from the checkout, the package from the wheel (tests/ is not in the wheel): grpo_guard must come
  # from /tmp/gg_site (checked by the first line of the output)
  mkdir -p /tmp/gg_tests && cp -r tests /tmp/gg_tests/ && (cd /tmp/gg_tests && PYTHONPATH=/tmp/gg_site timeout "$(cap 150)" \
    python3 -c "import grpo_guard, sys; print('grpo_guard from', grpo_guard.__file__); sys.exit(__import__('pytest').main(
    ['-q', '-p', 'no:cacheprovider', '-x', 'tests/test_cuda_backend.py', 'tests/test_policy_loss.py', 'tests/test_dppo.py',
     '-k', 'cuda']))") >> "$OUT/wheel.log" 2>&1
  echo "wheel tests exit status $?"; grep -E "grpo_guard from|passed|failed|^(FAILED|ERROR)" "$OUT/wheel.log" | head -12
fi
fi

# ab_pair NAME VAR PROVIDER: PROVIDER timed with VAR=0, then VAR=1 (bf16, GPU time) -> $OUT/NAME0.csv, NAME1.csv
ab_pair() {
  local name=$1 var=$2 provider=$3 val
  for val in 0 1; do
    env "$var=$val" timeout "$(cap 90)" python3 benchmarks/run_gpu.py --providers "$provider" \
      --shapes sd35_512,flux_1024,wan_480p --dtypes bf16 --modes forward,full,rollout --rep 50 \
      --out "$OUT/$name$val.csv" > "/tmp/$name$val.log" 2>&1
    echo "run_gpu ($var=$val) exit status $?"; grep -E "copy bandwidth|^(sde_step|policy_loss) " "/tmp/$name$val.log"
  done
}

if want ab; then
step "Triton kernel sets side by side: split vs single-launch forward (bf16, GPU time)"
ab_pair ab_fused GRPO_GUARD_TRITON_FUSED gg-triton
fi

if want ab_lean; then
step "lean single-launch Triton kernels (GRPO_GUARD_TRITON_LEAN=1): op tests, then GPU time side by side"
GRPO_GUARD_TRITON_LEAN=1 timeout "$(cap 150)" python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 120 -rfEs \
  tests/test_triton_kernels.py tests/test_sde_step.py tests/test_policy_loss.py tests/test_no_sync.py \
  tests/test_cuda_graphs.py -k "lean or triton" > "$OUT/tests_lean.log" 2>&1
echo "pytest (lean) exit status $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests_lean.log" | cut -c1-200 | head -20
tail -2 "$OUT/tests_lean.log"
ab_pair ab_lean_ GRPO_GUARD_TRITON_LEAN gg-triton
fi

if want ab_cuda; then
step "CUDA fallback kernel sets side by side: default vs GRPO_GUARD_CUDA_V2=1 (bf16, GPU time, host time)"
ab_pair ab_cuda_v2_ GRPO_GUARD_CUDA_V2 gg-cuda
GRPO_GUARD_CUDA_V2=1 GRPO_GUARD_CUDA_V2_FUSED=0 timeout "$(cap 90)" python3 benchmarks/run_gpu.py --providers gg-cuda \
  --shapes sd35_512,flux_1024,wan_480p --dtypes bf16 --modes forward,full,rollout --rep 50 \
  --out "$OUT/ab_cuda_v2_twolaunch.csv" > /tmp/ab_cuda_v2_twolaunch.log 2>&1
echo "run_gpu (V2, two-launch forwards) exit status $?"
for v2 in 0 1; do
  GRPO_GUARD_CUDA_V2=$v2 timeout "$(cap 40)" python3 benchmarks/host_overhead.py --backends cuda \
    --csv "$OUT/host_overhead_cuda_v2_$v2.csv" 2>&1 | tail -9
done
fi

if want sweep_fused; then
step "single-launch kernels: launch-geometry sweep"
timeout "$(cap 120)" python3 benchmarks/tune_triton.py --fused --budget "$(( $(cap 120) - 40 ))" > /tmp/tune_fused.log 2>&1
cat /tmp/tune_fused.log; cp /tmp/tune_fused.log "$OUT/tune_fused.txt"
fi

if want bench; then
step "op benchmarks"
timeout "$(cap 170)" python3 benchmarks/run_gpu.py --providers eager,gg-torch,gg-triton,gg-cuda --rep 50 \
  --out "$OUT/results.csv" > "$OUT/bench.log" 2>&1
echo "run_gpu exit status $?"; grep -E "copy bandwidth|x faster|slower|error" "$OUT/bench.log" | head -40
[ -s "$OUT/results.csv" ] && python3 -m benchmarks.suite --passes-from "$OUT/results.csv" \
  --provider gg-triton,gg-cuda > "$OUT/passes.md" 2>&1 && grep bfloat16 "$OUT/passes.md"
fi

if want trainer; then
step "trainer step, SD3.5-M-sized transformer"
timeout "$(cap 150)" python3 benchmarks/bench_trainer.py --steps ${TRAINER_STEPS:-2} --batch-size 2 --num-batches 1 \
  --out "$OUT/trainer.json" 2>&1 | grep -v "kept in float32"
fi

if want wan; then
step "trainer step, Wan 2.1 T2V 1.3B-sized transformer, 480 x 832, 33 frames (then 81), gradient checkpointing"
for frames in 33 81; do
  timeout "$(cap 150)" python3 benchmarks/bench_trainer.py --model wan --frames $frames --steps ${TRAINER_STEPS:-1} \
    --batch-size 1 --num-batches 2 --gradient-checkpointing --out "$OUT/trainer_wan_$frames.json" 2>&1 \
    | grep -v "kept in float32"
done
fi

if want deepspeed; then
step "tiny trainer under DeepSpeed ZeRO-2 on the GPU (1 process, bf16): 2 steps, then resume to 3"
if python3 -c "import deepspeed" > /dev/null 2>&1; then
  rm -rf /tmp/ds_gpu
  for n in 2 3; do
    timeout "$(cap 90)" python3 -m accelerate.commands.launch --use_deepspeed --zero_stage 2 --num_processes 1 \
      --num_machines 1 --mixed_precision bf16 -m grpo_guard.train configs/tiny_sd3.yaml --output-dir /tmp/ds_gpu \
      --set run.cpu=false --set run.mixed_precision=bf16 --set run.progress=false --set run.num_steps=$n \
      $( (( n == 3 )) && echo --resume ) > "$OUT/deepspeed_$n.log" 2>&1
    echo "deepspeed ($n steps) exit status $?"; grep -E "rror|resumed" "$OUT/deepspeed_$n.log" | tail -4
  done
  cp /tmp/ds_gpu/metrics.jsonl "$OUT/deepspeed_metrics.jsonl" 2>/dev/null \
    && python3 -c "import json; [print({k: v for k, v in json.loads(l)['updates'][0].items() if k != 'timesteps'})
      for l in open('$OUT/deepspeed_metrics.jsonl')]"
else
  echo "deepspeed not installed: skipped"
fi
fi

if want fp16; then
step "tiny trainer with flow_grpo's precision on the GPU: fp16 autocast + accelerate's loss scaler, float32 latents"
if python3 -c "import diffusers, peft, accelerate" > /dev/null 2>&1; then
  timeout "$(cap 90)" python3 -m grpo_guard.train configs/tiny_sd3.yaml --output-dir /tmp/fp16_gpu \
    --set run.cpu=false --set run.mixed_precision=fp16 --set model.latent_dtype=float32 \
    --set model.vae_dtype=float32 --set model.text_encoder_dtype=float16 --set train.updates_per_step=2 \
    --set run.progress=false --set run.num_steps=3 > "$OUT/fp16.log" 2>&1
  echo "fp16 trainer exit status $?"; tail -3 "$OUT/fp16.log"
  python3 -c "import json; [print({k: v for k, v in u.items() if k != 'timesteps'}, [t['ratio_mean'] for t in u['timesteps']])
    for l in open('/tmp/fp16_gpu/metrics.jsonl') for u in json.loads(l)['updates']]"
else
  echo "diffusers/peft/accelerate not installed (carry wheels in .whl): skipped"
fi
fi

if want sweep; then
step "Triton launch-geometry sweep"
timeout "$(cap 100)" python3 benchmarks/tune_triton.py --budget "$(( $(cap 100) - 45 ))" > /tmp/tune.log 2>&1
cat /tmp/tune.log
fi

if want host; then
step "host time per call (default validation, tiny shape: what a loop's thread pays)"
timeout "$(cap 90)" python3 benchmarks/host_overhead.py --device cuda --csv "$OUT/host_overhead.csv" 2>&1 | tail -30
if [ -n "${HOST_AGAINST:-}" ]; then  # an older checkout carried to the machine (e.g. .old9c: issue 9's "today")
  step "host time per call, $HOST_AGAINST vs this checkout, alternating rounds"
  timeout "$(cap 150)" python3 benchmarks/host_overhead.py --device cuda --against "$HOST_AGAINST" --rounds 3 \
    --csv-pair "$OUT/host_overhead_before.csv" "$OUT/host_overhead_after.csv" 2>&1 | tail -30
fi
fi

if want compile; then
step "torch.compile baselines"
timeout "$(cap 150)" python3 benchmarks/run_gpu.py --providers eager,compile --shapes sd35_512,wan_480p --dtypes bf16 \
  --modes ${COMPILE_MODES:-forward,backward,full,rollout} --rep 50 --out "$OUT/results_compile.csv" \
  > /tmp/bench_compile.log 2>&1
echo "run_gpu (compile) exit status $?"; grep -E "^(op|sde_step|policy_loss) " /tmp/bench_compile.log
fi
step done
