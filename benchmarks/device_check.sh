#!/usr/bin/env bash
# The GPU checks of ash_ext's CUDA backend: one unattended run on a lent H100/H200 in at most
# 8 minutes, with that machine's own torch, nvcc and compute-sanitizer (no network, no pip).
# Steps, in this order, with their timeouts and (what they should take):
#   environment  GPU, driver, nvcc, torch, compute-sanitizer, ninja; $OUT/environment.log     (~5 s)
#   build        python setup.py build_ext --inplace, sm_90, MAX_JOBS=nproc          240 s (150-180 s)
#   import       CUDA tensors reach the kernels; the planner's limits (gpu_cases.py --limits) 60 s (5 s)
#   grid         benchmarks/gpu_cases.py, CUDA_LAUNCH_BLOCKING=1: ~330 cases, every regime,
#                boundary and window, tied and continuous data, every dtype, vs the fallback, and
#                the shaping family (per-sample k, clamp, SCALE, topk_stats) vs the spec   90 s (30-70 s)
#   tests_rest   pytest tests/ but test_cuda.py, in the background while grid and test_cuda
#                run (mostly CPU); waited for before the bench                        120 s (40-90 s)
#   test_cuda    pytest -x tests/test_cuda.py                                          120 s (40-60 s)
#   regimes      gpu_cases.py on the model and long shapes with ASH_EXT_CUDA_REGIME=chunked, then
#                =sample-per-block: on a Hopper the grid sends long samples to clusters, so
#                these two regimes' kernels run only when forced                   60 s (20-40 s)
#   large        tools/large_sizes.py --device cuda: float16 inputs past 2^31 elements (a batch, one
#                sample) through every variant and topk_stats, checked on the host; in the
#                background with tests_rest                                           120 s (40-80 s)
#   bench        benchmarks/gpu_bench.py, alone on the GPU, with every regime side by side on
#                the cluster regime's target shapes                                 90 s (30-50 s)
#   memcheck, racecheck, synccheck, initcheck: compute-sanitizer on benchmarks/sanitize_cases.py,
#                the four at once (racecheck with --quick; memcheck and initcheck without the caching
#                allocator, whose blocks would hide out-of-bounds and uninitialised reads) each 130 s (60-110 s)
# Every step has a timeout, cut short where the overall budget (ASH_CHECK_BUDGET_S, default 465 s)
# would run out; until the sanitizers start, 90 s of it are kept for them. ASH_CHECK_STOP_AT tells
# the Python scripts when to stop starting cases, so that they still print their summaries. A
# failed step does not stop the later ones, except that nothing runs after a failed build or
# import. Logs: $OUT/<step>.log ($OUT defaults to ./device_out); at the end one table (step, exit
# status, seconds, result) is printed and saved as $OUT/summary.txt. Exit status: the number of
# failed or skipped steps. Run from anywhere: bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
PY="${PYTHON:-python3}"
now() { date +%s; }
START=$(now)
DEADLINE=$((START + ${ASH_CHECK_BUDGET_S:-465}))
RESERVE=90  # seconds kept for the sanitizers until they start
FAILED=0
ROWS=""
BLOCKED=""  # why the remaining steps cannot run (a failed build or import)
declare -A BG_PID BG_START
trap 'kill $(jobs -p) 2>/dev/null; exit 130' INT TERM

add_row() {  # add_row NAME RC SECONDS RESULT
  ROWS+="$(printf '%-11s %-5s %5s  %s' "$1" "$2" "$3" "$4")"$'\n'
  if [ "$2" != "0" ]; then FAILED=$((FAILED + 1)); fi
}

result_of() {  # result_of NAME RC: one line of result, from $OUT/NAME.log
  local name="$1" rc="$2" log="$OUT/$1.log" line="" extra=""
  if [ ! -f "$log" ]; then echo "no log"; return; fi
  case "$name" in
    build)
      if [ "$rc" = 0 ]; then line="built; $(grep -c -i 'warning' "$log") lines mention a warning"
      else line="$(grep -m 1 -i -E 'error' "$log")"; fi ;;
    test_cuda | tests_rest)
      line="$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | tr -d '=' \
        | sed 's/^ *//; s/ *$//')" ;;
    memcheck | racecheck | synccheck | initcheck)
      line="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')"
      extra="$(grep '^summary:' "$log" | tail -n 1 | sed 's/^summary: *//')"
      line="${line:-no sanitizer summary}; ${extra:-no case summary}"
      extra="$(grep -c 'Program hit' "$log")"
      if [ "$extra" -gt 0 ]; then line+="; $extra CUDA API error reports"; fi ;;
    *)
      line="$(grep '^summary:' "$log" | tail -n 1 | sed 's/^summary: *//')" ;;
  esac
  if [ -z "$line" ]; then line="last line: $(grep -v -e '^[[:space:]]*$' "$log" | tail -n 1)"; fi
  case "$rc" in 124 | 137) line="TIMED OUT; $line" ;; esac
  printf '%s' "$line" | cut -c 1-120
}

can_start() {  # can_start NAME TIMEOUT: sets STEP_LIMIT, or records the step as skipped and fails
  local name="$1" limit="$2" left=$(($DEADLINE - $(now) - RESERVE))
  if [ -n "$BLOCKED" ]; then
    echo "=== [$name] skipped: $BLOCKED"
    add_row "$name" skip 0 "skipped: $BLOCKED"
    return 1
  fi
  if [ "$left" -lt 20 ]; then
    echo "=== [$name] skipped: out of time"
    add_row "$name" skip 0 "skipped: out of time"
    return 1
  fi
  STEP_LIMIT=$((limit < left ? limit : left))
}

stop_at() {  # stop_at STARTED LIMIT: when the scripts stop starting cases (a fifth of the time left over)
  local margin=$(($2 / 5))
  if [ "$margin" -lt 15 ]; then margin=15; fi
  echo $(($1 + $2 - margin))
}

step() {  # step NAME TIMEOUT_SECONDS COMMAND...: runs it in the foreground, log in $OUT/NAME.log
  local name="$1" limit started rc took
  can_start "$name" "$2" || return 1
  shift 2
  limit=$STEP_LIMIT
  started=$(now)
  echo "=== [$name] start (timeout ${limit}s): $*"
  ASH_CHECK_STOP_AT=$(stop_at "$started" "$limit") timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  took=$(($(now) - started))
  echo "=== [$name] rc=$rc in ${took}s"
  add_row "$name" "$rc" "$took" "$(result_of "$name" "$rc")"
  return "$rc"
}

step_bg() {  # step_bg NAME TIMEOUT_SECONDS COMMAND...: the same in the background; step_wait collects it
  local name="$1" limit started
  can_start "$name" "$2" || return 1
  shift 2
  limit=$STEP_LIMIT
  started=$(now)
  echo "=== [$name] start in the background (timeout ${limit}s): $*"
  rm -f "$OUT/$name.rc"
  (
    ASH_CHECK_STOP_AT=$(stop_at "$started" "$limit") timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$? $(date +%s)" >"$OUT/$name.rc"
  ) &
  BG_PID[$name]=$!
  BG_START[$name]=$started
}

step_wait() {  # step_wait NAME...: waits for background steps, shows the end of their logs, records them
  local name rc ended took
  for name in "$@"; do
    if [ -z "${BG_PID[$name]:-}" ]; then continue; fi
    wait "${BG_PID[$name]}"
    if ! { read -r rc ended <"$OUT/$name.rc"; } 2>/dev/null; then rc=255; ended=$(now); fi
    took=$((ended - ${BG_START[$name]}))
    echo "=== [$name] rc=$rc in ${took}s (in the background); the end of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log"
    add_row "$name" "$rc" "$took" "$(result_of "$name" "$rc")"
    unset "BG_PID[$name]"
  done
}

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -n "$NVCC" ]; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
fi
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
SAN_HELP="$(timeout 30 "$SANITIZER" --help 2>&1 || true)"
SAN_OPTS=(--error-exitcode 1 --print-limit 20)
# Four tools run at once: each gets ports of its own, and time to attach on a busy machine.
if grep -q -e '--launch-timeout' <<<"$SAN_HELP"; then SAN_OPTS+=(--launch-timeout 120); fi
port_opts() { if grep -q -e '--base-port' <<<"$SAN_HELP"; then echo "--base-port $((49152 + 64 * $1))"; fi; }

echo "=== environment"
{
  echo "date $(date -u +%FT%TZ), $(nproc) CPUs, budget ${ASH_CHECK_BUDGET_S:-465}s, OUT=$OUT"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader \
    || echo "nvidia-smi failed"
  if [ -n "$NVCC" ]; then "$NVCC" --version | tail -n 2; echo "CUDA_HOME=$CUDA_HOME"; else echo "nvcc not found"; fi
  timeout 30 "$SANITIZER" --version 2>&1 | head -n 2
  echo "compute-sanitizer options: ${SAN_OPTS[*]} $(port_opts 0)"
  timeout 60 "$PY" -c "import sys, torch, torch.utils.cpp_extension as ext
p = torch.cuda.get_device_properties(0)
print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '|', p.name,
      p.multi_processor_count, 'SMs, opt-in shared', getattr(p, 'shared_memory_per_block_optin', '?'),
      'B | ninja', ext.is_ninja_available())"
  timeout 30 "$PY" -m pytest --version 2>&1 | head -n 1
} 2>&1 | tee "$OUT/environment.log"

# Build with the machine's torch and nvcc (one translation unit per dtype, in parallel).
rm -f ash_ext/_C*.so
if [ -z "$NVCC" ]; then
  add_row build 127 0 "nvcc not found"
  BLOCKED="no nvcc, no build"
else
  step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace \
    || BLOCKED="the build failed"
  echo "=== [build] the first lines that mention a warning or an error:"
  grep -i -E "warning|error" "$OUT/build.log" 2>/dev/null | head -n 20
fi
step import 60 "$PY" benchmarks/gpu_cases.py --limits || BLOCKED="${BLOCKED:-CUDA tensors do not reach the kernels}"

# The shape grid first; the rest of tests/ alongside it and test_cuda (it is mostly CPU work).
step_bg tests_rest 120 env OMP_NUM_THREADS=8 ASH_EXT_EMULATION= "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
  tests --ignore=tests/test_cuda.py
step grid 90 env CUDA_LAUNCH_BLOCKING=1 OMP_NUM_THREADS=4 "$PY" benchmarks/gpu_cases.py
step test_cuda 120 env OMP_NUM_THREADS=8 "$PY" -m pytest -x -q -p no:cacheprovider --durations=5 tests/test_cuda.py
step regimes 60 bash -c "env ASH_EXT_CUDA_REGIME=chunked CUDA_LAUNCH_BLOCKING=1 OMP_NUM_THREADS=4 \
  $PY benchmarks/gpu_cases.py --only 'resnet50|limit\\+1|long'; a=\$?; \
  env ASH_EXT_CUDA_REGIME=sample-per-block CUDA_LAUNCH_BLOCKING=1 OMP_NUM_THREADS=4 \
  $PY benchmarks/gpu_cases.py --only 'resnet50|limit\\+1|long-batch'; exit \$((a + \$?))"
step_bg large 120 env OMP_NUM_THREADS=4 "$PY" tools/large_sizes.py --device cuda
step_wait tests_rest large

# The benchmark, with nothing else on the GPU.
step bench 90 "$PY" benchmarks/gpu_bench.py

# The sanitizers, all four at once (4 CPU threads each for the CPU reference).
RESERVE=0
if [ ! -x "$SANITIZER" ]; then BLOCKED="${BLOCKED:-compute-sanitizer not found}"; fi
# shellcheck disable=SC2046  # port_opts is empty or two words
{
  step_bg memcheck 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 OMP_NUM_THREADS=4 "$SANITIZER" --tool memcheck \
    "${SAN_OPTS[@]}" $(port_opts 0) "$PY" benchmarks/sanitize_cases.py
  step_bg racecheck 130 env OMP_NUM_THREADS=4 "$SANITIZER" --tool racecheck "${SAN_OPTS[@]}" $(port_opts 1) \
    "$PY" benchmarks/sanitize_cases.py --quick
  step_bg synccheck 130 env OMP_NUM_THREADS=4 "$SANITIZER" --tool synccheck "${SAN_OPTS[@]}" $(port_opts 2) \
    "$PY" benchmarks/sanitize_cases.py
  step_bg initcheck 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 OMP_NUM_THREADS=4 "$SANITIZER" --tool initcheck \
    "${SAN_OPTS[@]}" $(port_opts 3) "$PY" benchmarks/sanitize_cases.py
}
step_wait memcheck racecheck synccheck initcheck

echo
echo "=== benchmark table"
sed -n '/^shape /,$p' "$OUT/bench.log" 2>/dev/null
echo
echo "=== summary"
{
  printf '%-11s %-5s %5s  %s\n' step rc secs result
  printf '%s' "$ROWS"
  printf '%-11s %-5s %5s  %s\n' total "$FAILED" "$(($(now) - START))" "failed or skipped steps; logs in $OUT"
} | tee "$OUT/summary.txt"
exit "$FAILED"
