#!/usr/bin/env bash
# GPU checks and benchmarks of the integration (adapters, calibration, demo, CFG), in two parts that each
# fit one 10-minute device call. Logs and result files go to $OUT (default ./gpu_out).
# Usage (repo root, diffusers importable):  bash benchmarks/gpu_suite.sh part1|part2
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env_$1.txt"
case "$1" in
part1)
  timeout 170 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  timeout 230 python benchmarks/bench_wan_forward.py --layers 20 --record "$OUT/wan_forward.md" 2>&1 | tee "$OUT/wan_forward.log" | tail -30
  timeout 180 python benchmarks/bench_calibration.py --layers 10 --json "$OUT/calibration.json" 2>&1 | tee "$OUT/calibration.log" | tail -20
  ;;
part2)
  timeout 300 python -m isa_plugin demo --size large --out "$OUT/demo" 2>&1 | grep -v "calibrating:" | tee "$OUT/demo.log" | tail -30
  cp "$OUT/demo/report.json" "$OUT/demo_report.json" 2>/dev/null
  cp "$OUT/demo/plot.png" "$OUT/demo_plot.png" 2>/dev/null
  timeout 200 python benchmarks/bench_cfg_share.py --record "$OUT/cfg_share.md" 2>&1 | tee "$OUT/cfg_share.log" | tail -25
  ;;
*) echo "usage: $0 part1|part2"; exit 2 ;;
esac
