#!/usr/bin/env bash
# LTX-2 family calibration time on the CPU at a reduced size (2 of 48 layers, 4 heads x 128, 8 + 8 latent frames of
# 16 x 24 = 6,144 video tokens, 2 videos x 2 timesteps, batch 2 = cond + uncond), default sampling (48 blocks x 16
# tokens per kind). before/after as in run.sh (BEFORE: the exported tree of c5f8b74 with this branch's
# benchmarks/bench_calibration.py copied in, for --mode). Run from the repository root.
set -euo pipefail
ROOT=$(pwd)
OUT=$ROOT/benchmarks/results/2026-12-05-cpu-caltime/ltx2_cpu_reduced
BEFORE=${BEFORE:?set BEFORE to the exported tree of c5f8b74}
PY=${PY:-python}
SHAPE="--device cpu --layers 2 --heads 4 --frames 8 --context-frames 8 --timesteps 2"
mkdir -p "$OUT"
"$PY" benchmarks/bench_calibration_family.py $SHAPE --json "$OUT/fixed_after.json" 2>&1 | tee "$OUT/fixed_after.log"
(cd "$BEFORE" && "$PY" benchmarks/bench_calibration_family.py $SHAPE --mode fixed --mode adaptive --json "$OUT/both_before.json") 2>&1 \
  | tee "$OUT/both_before.log"
"$PY" benchmarks/bench_calibration_family.py $SHAPE --mode fixed --mode adaptive --json "$OUT/both_after.json" 2>&1 | tee "$OUT/both_after.log"
