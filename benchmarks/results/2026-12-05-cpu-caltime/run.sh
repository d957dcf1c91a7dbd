#!/usr/bin/env bash
# Calibration time before and after the adaptive measurement's rewrite, same machine, same session, alternating.
# before: the package at main c5f8b74, exported with `git archive c5f8b74 | tar -x -C $BEFORE`, with this branch's
# benchmarks/bench_levers.py copied in (for --timing-only); after: this branch. Run from the repository root.
set -euo pipefail
ROOT=$(pwd)
OUT=$ROOT/benchmarks/results/2026-12-05-cpu-caltime
BEFORE=${BEFORE:?set BEFORE to the exported tree of c5f8b74}
PY=${PY:-python}
run() {
  local label=$1; shift
  for side in before after; do
    local dir=$ROOT; [ "$side" = before ] && dir=$BEFORE
    mkdir -p "$OUT/$label"
    (cd "$dir" && "$PY" -c 'import sys; sys.path.insert(0, "."); import isa_plugin; print("isa_plugin from", isa_plugin.__file__)' \
      && "$PY" benchmarks/bench_levers.py --threads 2 --timing-only --out "$OUT/$label/$side" "$@") 2>&1 | tee "$OUT/$label/$side.log"
  done
}
# configurations: label and options; `run.sh LABEL...` runs the named ones (default: all), SUFFIX=_run2 labels a repeat
declare -A CONFIGS=(
  [n4096_h4_d64]=""                                    # the levers study's shape (N = 4,096, 4 heads, D = 64, 3 layers)
  [n4096_h8_d128]="--heads 8 --head-dim 128"
  [n8192_h8_d64]="--width 32 --heads 8"                # N = 8,192
  [n4096_h4_d64_bpk48]="--blocks-per-kind 48"          # isa calibrate's sampling: every query block at this N
)
for label in ${@:-n4096_h4_d64 n4096_h8_d128 n8192_h8_d64 n4096_h4_d64_bpk48}; do
  run "$label${SUFFIX:-}" ${CONFIGS[$label]}
done
