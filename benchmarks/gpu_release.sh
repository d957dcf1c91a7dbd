#!/usr/bin/env bash
# GPU checks and benchmarks of a release, in parts that each fit one 10-minute device call.
# Logs and result files go to $OUT (default ./gpu_out). Needs diffusers importable (see the README).
# Usage (repo root):  bash benchmarks/gpu_release.sh a|b
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %H' 2>/dev/null || true
} | tee "$OUT/env_$1.txt"
run() {  # run NAME TIMEOUT CMD...: one step, its log in $OUT/NAME.log, its status in $OUT/status.txt
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/status.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/status.txt"
  tail -25 "$OUT/$name.log"
}
case "$1" in
a)
  run gpu_tests 230 python -m pytest -q -m gpu tests -p no:cacheprovider
  run wan_forward 190 python benchmarks/bench_wan_forward.py --layers 8 --reps 3 --warmup 1 --record "$OUT/wan_forward.md"
  run liveditor 150 python benchmarks/bench_liveditor.py --layers 8 --reps 3 --warmup 1 --record "$OUT/liveditor.md"
  ;;
b)
  run gpu_tests 190 python -m pytest -q -m gpu tests -p no:cacheprovider -n 8
  run pareto 150 python benchmarks/bench_pareto.py --n 65536 65520 --heads 40 --quick --adaptive-block-sizes 128 --out "$OUT/pareto"
  run calibration_ltx2 105 python benchmarks/bench_calibration_family.py --json "$OUT/calibration_ltx2.json"
  run liveditor 75 python benchmarks/bench_liveditor.py --layers 8 --reps 3 --warmup 1 --record "$OUT/liveditor.md"
  run context_parallel 55 torchrun --nproc_per_node 1 benchmarks/bench_context_parallel.py --layers 2
  ;;
*) echo "usage: $0 a|b"; exit 2 ;;
esac
