#!/usr/bin/env bash
# The CUDA launch plans of the cluster regime's target shapes (issue: one launch, at most 1.02 x
# one read + one write on an H100/H200) and of the same shapes on an A100, printed by
# `python -m ash_ext plan` (no GPU needed) into benchmarks/results/plan/: one text file with
# every plan, and the JSON of each.
#   bash benchmarks/plan_targets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=benchmarks/results/plan
mkdir -p "$OUT"
: >"$OUT/targets.txt"
for gpu in h100 h200 a100; do
  for spec in "64,2048,7,7 float32" "256,2048,7,7 float32" "8,2048,7,7 float32" "32,1024,14,14 float32" \
    "64,2048,7,7 bfloat16"; do
    read -r shape dtype <<<"$spec"
    for variant in ash-s ash-p; do
      echo "\$ python -m ash_ext plan --shape $shape --dtype $dtype --gpu $gpu --variant $variant" >>"$OUT/targets.txt"
      "$PY" -m ash_ext plan --shape "$shape" --dtype "$dtype" --gpu "$gpu" --variant "$variant" >>"$OUT/targets.txt"
      echo >>"$OUT/targets.txt"
      "$PY" -m ash_ext plan --shape "$shape" --dtype "$dtype" --gpu "$gpu" --variant "$variant" --json \
        >"$OUT/${gpu}_${shape//,/x}_${dtype}_${variant}.json"
    done
  done
done
# The backward and a forced regime, for comparison.
for extra in "--backward" "--regime chunked" "--regime sample-per-block"; do
  echo "\$ python -m ash_ext plan --shape 64,2048,7,7 --gpu h100 $extra" >>"$OUT/targets.txt"
  # shellcheck disable=SC2086  # $extra is one or two words
  "$PY" -m ash_ext plan --shape 64,2048,7,7 --gpu h100 $extra >>"$OUT/targets.txt"
  echo >>"$OUT/targets.txt"
done
grep -c '^regime:' "$OUT/targets.txt" | xargs echo "plans written to $OUT/targets.txt:"
