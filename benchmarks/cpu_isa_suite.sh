#!/usr/bin/env bash
# The CPU kernel per ISA build and dtype, on issue 12's target shapes: for every ISA this CPU
# runs (python -m ash_ext bench --cpu-isa), float32 against the reference and the clone with
# rotating inputs and in cache, and every dtype against float32. Results (JSON, CSV, the printed
# Markdown tables) go to benchmarks/results/cpu-isa/<isa>/.
#   bash benchmarks/cpu_isa_suite.sh [python]      (default: .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=benchmarks/results/cpu-isa
ISAS=$("$PY" -c "import ash_ext; print(' '.join(ash_ext.cpu_isas()))")
COMMON=(--variants ash-p ash-b ash-s --percentiles 0.65 0.9 --markdown --no-plot --no-progress)
# The four target shapes, each with its batch: [64|8, 2048, 7, 7], [256, 2048], [128, 640, 8, 8].
CASES=("resnet50-l4:8,64" "resnet50-pooled:256" "wrn28-10:128")
for isa in $ISAS; do
  mkdir -p "$OUT/$isa"
  for case in "${CASES[@]}"; do
    shape=${case%%:*}
    batches=${case#*:}
    # float32 against the reference, rotating inputs (twice the last-level cache).
    "$PY" -m ash_ext bench --cpu-isa "$isa" --shapes "$shape" --batches ${batches//,/ } --dtypes float32 \
      --impls reference ash_ext clone "${COMMON[@]}" --out "$OUT/$isa/$shape-rotating" \
      | tee "$OUT/$isa/$shape-rotating.md"
    # The same in cache: two inputs alternate (--cache-mb tiny makes the rotation its minimum, 2).
    "$PY" -m ash_ext bench --cpu-isa "$isa" --shapes "$shape" --batches ${batches//,/ } --dtypes float32 \
      --impls reference ash_ext clone "${COMMON[@]}" --cache-mb 0.01 --out "$OUT/$isa/$shape-in-cache" \
      | tee "$OUT/$isa/$shape-in-cache.md"
    # Every dtype, ash_ext and the clone only (per-element time against float32's).
    "$PY" -m ash_ext bench --cpu-isa "$isa" --shapes "$shape" --batches ${batches//,/ } \
      --dtypes float32 float16 bfloat16 float64 --impls ash_ext clone "${COMMON[@]}" --min-time 0.2 \
      --out "$OUT/$isa/$shape-dtypes" | tee "$OUT/$isa/$shape-dtypes.md"
  done
done
