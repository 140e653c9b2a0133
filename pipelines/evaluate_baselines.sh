#!/usr/bin/env bash
# Score the classical baselines (SEP, photutils) on 50 simulated scenes.
# Seed 1000 is never used for data/ (seeds 7, 8) nor for training.
# Usage: bash pipelines/evaluate_baselines.sh   (from the repository root, venv active or via make)
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUN=${RUN:-runs/eval_baselines}
TIMES=pipelines/results/baselines_timing.txt
rm -rf "$RUN"
: > "$TIMES"
timed() {  # label, command...: append wall seconds (whole process, start-up included)
  local label=$1; shift
  local t0 t1 ms; t0=$(date +%s%N); "$@"; t1=$(date +%s%N); ms=$(( (t1 - t0) / 1000000 ))
  printf '%s: %d.%01d s wall\n' "$label" $((ms / 1000)) $((ms % 1000 / 100)) | tee -a "$TIMES"
}
timed "simulate 50 scenes" "$BIN/deblend" -q simulate --n 50 --out "$RUN/truth" --seed 1000
for method in sep photutils; do
  timed "$method on 50 scenes" "$BIN/deblend" -q run "$RUN/truth" -o "$RUN/$method" --method "$method"
done
"$BIN/deblend" evaluate --pred "$RUN/sep" "$RUN/photutils" --truth "$RUN/truth" \
  --json pipelines/results/baselines.json | tee pipelines/results/baselines.txt
"$BIN/deblend" evaluate --pred "$RUN/sep" "$RUN/photutils" --truth "$RUN/truth" --min-snr 20 \
  --json pipelines/results/baselines_snr20.json | tee pipelines/results/baselines_snr20.txt
