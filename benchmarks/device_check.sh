#!/usr/bin/env bash
# The GPU checks of ash_ext's CUDA backend, in one run on a lent H100, in under 8 minutes:
#   1. build the extension for sm_90 with that machine's torch and nvcc;
#   2. pytest tests/test_cuda.py (stops at the first failure), then the rest of tests/;
#   3. the GPU benchmark (benchmarks/gpu_bench.py);
#   4. compute-sanitizer memcheck, racecheck and synccheck on benchmarks/sanitize_cases.py.
# Every step is timed and has its own timeout, cut short where the overall budget
# (ASH_CHECK_BUDGET_S, default 465 s) would run out; a failed step does not stop the later ones,
# and the exit status is the number of failed or skipped steps. Logs and results go to $OUT
# (default ./device_out). Run from anywhere: bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
DEADLINE=$((SECONDS + ${ASH_CHECK_BUDGET_S:-465}))
FAILED=0
SUMMARY=""

step() {  # step NAME TIMEOUT_SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] skipped: out of time"
    SUMMARY+="$(printf '%-12s skipped (out of time)' "$name")"$'\n'
    FAILED=$((FAILED + 1))
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  local started=$SECONDS
  echo "=== [$name] start (timeout ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - started))
  echo "=== [$name] rc=$rc in ${took}s"
  SUMMARY+="$(printf '%-12s rc=%-4s %4ss' "$name" "$rc" "$took")"$'\n'
  if [ "$rc" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
  return "$rc"
}

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then echo "nvcc not found"; exit 1; fi
CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"

echo "=== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$NVCC" --version | tail -2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
echo "CUDA_HOME=$CUDA_HOME nproc=$(nproc)"

# 1. Build (one translation unit per dtype, compiled in parallel).
rm -f ash_ext/_C*.so
step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
grep -i -E "warning|error" "$OUT/build.log" | head -20
"$PY" -c "import ash_ext, torch; x = torch.zeros(1, 1, device='cuda')
print('compiled_with_cuda', ash_ext.compiled_with_cuda(), ash_ext.implementation_for(x))"

# 2. Tests: the CUDA tests first, then everything else (skips are fine).
step test_cuda 120 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_cuda.py
step tests_rest 60 "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cuda.py

# 3. Benchmark.
step bench 90 "$PY" benchmarks/gpu_bench.py

# 4. Sanitizers (without the caching allocator, whose blocks would hide out-of-bounds accesses).
step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  --print-limit 20 "$PY" benchmarks/sanitize_cases.py
step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitize_cases.py
step synccheck 45 "$SANITIZER" --tool synccheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitize_cases.py

echo
echo "=== benchmark table"
sed -n '/^shape /,$p' "$OUT/bench.log" 2>/dev/null
echo
echo "=== summary (total ${SECONDS}s)"
printf '%s' "$SUMMARY" | tee "$OUT/summary.txt"
exit "$FAILED"
