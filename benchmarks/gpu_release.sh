#!/usr/bin/env bash
# GPU checks and benchmarks, in parts that each fit one 10-minute device call: a and b (the release run:
# GPU tests, Wan and LIVEditor forwards, Pareto fronts, calibration time, context parallelism), part1 and
# part2 (the integration run: Wan forward at 20 layers, Wan calibration time, the large demo, CFG plan sharing),
# c and d (the executor run: the block-sparse executor's benchmark and GPU tests; the whole GPU suite, the
# Pareto fronts with the block-sparse executor, the fixed defaults), and e (LIVEditor's precision regime in bf16
# against float32).
# Logs and result files go to $OUT (default ./gpu_out). Needs diffusers importable (see the README).
# e and f (speed within budget: the Pareto fronts on the block-sparse executor at 65,536 / 65,520 and 131,072, the
# diffuse workload, the fixed defaults, the Wan forward with the within-budget setting), g (the GPU suite, the Wan
# forward with both modes), h (LIVEditor's precision regime against float32), i (the executor and planning tests, the
# precision check in brief, the executors' cost model for dispatch, the planning profile), j (the fused adaptive
# planner: its tests, its profile, the Pareto settings within budget at three lengths, the Wan forward), k (the GPU
# suite, the exact-pair rate, the planning profile, the diffuse workload), l (k-means pseudo-keys: their GPU tests,
# the executor's time with 1, 4 and 8 pseudo-key slots per block, the slot kernel's share of a call) and m (k-means
# pseudo-keys within a budget: error, FLOPs and time against block means on both workloads), n (the GPU suite, the
# block-sparse executor's cost model refitted over block-mean and k-means settings), o (LTX-2's calibration time
# against its dense runs, the fixed mode alone and both modes).
# Usage (repo root):  bash benchmarks/gpu_release.sh a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|part1|part2
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
part1)
  run gpu_tests 170 python -m pytest -q -m gpu tests -p no:cacheprovider
  run wan_forward 230 python benchmarks/bench_wan_forward.py --layers 20 --record "$OUT/wan_forward.md"
  run calibration 180 python benchmarks/bench_calibration.py --layers 10 --json "$OUT/calibration.json"
  ;;
part2)
  run demo 300 python -m isa_plugin demo --size large --out "$OUT/demo"
  cp "$OUT/demo/report.json" "$OUT/demo_report.json" 2>/dev/null
  cp "$OUT/demo/plot.png" "$OUT/demo_plot.png" 2>/dev/null
  run cfg_share 200 python benchmarks/bench_cfg_share.py --record "$OUT/cfg_share.md"
  ;;
c)
  run sparse_tests 150 python -m pytest -q -m gpu tests/kernels/test_sparse_attn_gpu.py -p no:cacheprovider -x
  run sparse_bench 330 python benchmarks/bench_sparse_executor.py --json "$OUT/sparse_bench.json"
  ;;
d)
  run gpu_tests 240 python -m pytest -q -m gpu tests -p no:cacheprovider -n 8
  run pareto 240 python benchmarks/bench_pareto.py --n 65536 --heads 40 --quick --adaptive-block-sizes 128 --out "$OUT/pareto"
  ;;
e)
  run pareto_sparse 330 python benchmarks/bench_pareto.py --n 65536 65520 --heads 40 --modes adaptive --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 32 --adaptive-executors sparse --cost-model "$OUT/gpu_cost.json" --out "$OUT/pareto_sparse"
  run fixed_defaults 150 python benchmarks/bench_attention.py --n 65536 --heads 40 --no-flash --json "$OUT/fixed_defaults.json"
  ;;
f)
  run pareto_131k 240 python benchmarks/bench_pareto.py --n 131072 --heads 40 --modes adaptive --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 --adaptive-executors sparse --out "$OUT/pareto_131k"
  run pareto_diffuse 150 python benchmarks/bench_pareto.py --n 65536 --heads 40 --quick --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 32 --workload diffuse --out "$OUT/pareto_diffuse"
  run wan_forward 200 python benchmarks/bench_wan_forward.py --layers 8 --reps 3 --warmup 1 --block-size 128 --dense-backends cudnn --config '{"mode": "adaptive", "mass": 0.9, "pseudo_block": 128, "alpha_s": 1.0, "backend": "sparse"}' --record "$OUT/wan_forward.md"
  ;;
g)
  run gpu_tests 300 python -m pytest -q -m gpu tests -p no:cacheprovider -n 8
  run wan_forward_fixed 110 python benchmarks/bench_wan_forward.py --layers 8 --reps 3 --warmup 1 --dense-backends cudnn --record "$OUT/wan_forward.md"
  run wan_forward_adaptive 110 python benchmarks/bench_wan_forward.py --layers 8 --reps 3 --warmup 1 --block-size 128 --dense-backends cudnn --config '{"mode": "adaptive", "mass": 0.9, "pseudo_block": 128, "alpha_s": 1.0, "backend": "sparse"}' --record "$OUT/wan_forward.md"
  ;;
h)
  run liveditor_precision 540 python benchmarks/bench_liveditor_precision.py --json "$OUT/liveditor_precision.json"
  ;;
i)
  run gpu_tests_exec 200 python -m pytest -q -m gpu tests/kernels/test_sparse_attn_gpu.py tests/test_plan_reuse.py tests/executors tests/test_attention_gpu.py -p no:cacheprovider
  run liveditor_precision 170 python benchmarks/bench_liveditor_precision.py --reps 1 --warmup 0 --timesteps 999 162 --json "$OUT/liveditor_precision.json"
  cp isa_plugin/kernels/cost_model.json "$OUT/cost_model.json"
  run executor_costs 200 python benchmarks/bench_pareto.py --n 65536 --heads 40 --quick --fixed-defaults --fixed-executors triton sparse --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 --adaptive-alpha-s 1.0 --adaptive-masses 0.7 0.9 --executor-costs "$OUT/cost_model.json" --out "$OUT/executor_costs"
  run profile_plan 60 python benchmarks/profile_plan.py --n 65536 --heads 40
  ;;
j)
  run gpu_tests_plan 220 python -m pytest -q -m gpu tests/kernels/test_sparse_attn_gpu.py tests/test_plan_reuse.py tests/executors -p no:cacheprovider -n 4
  run profile_plan 60 python benchmarks/profile_plan.py --n 65536 --heads 40
  run pareto_fused 200 python benchmarks/bench_pareto.py --n 65536 65520 131072 --heads 40 --modes fixed adaptive --no-fixed-grid --fixed-defaults --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 --adaptive-alpha-s 1.0 --adaptive-masses 0.7 0.8 0.9 --out "$OUT/pareto_fused"
  run wan_forward 120 python benchmarks/bench_wan_forward.py --layers 8 --reps 3 --warmup 1 --block-size 128 --dense-backends cudnn --config '{"mode": "adaptive", "mass": 0.7, "pseudo_block": 128, "alpha_s": 1.0, "backend": "sparse"}' --record "$OUT/wan_forward.md"
  ;;
k)
  run gpu_suite 330 python -m pytest -q -m gpu tests -p no:cacheprovider -n 8
  run sparse_bench 120 python benchmarks/bench_sparse_executor.py --json "$OUT/sparse_bench.json"
  run profile_plan 60 python benchmarks/profile_plan.py --n 65536 --heads 40
  run pareto_diffuse 100 python benchmarks/bench_pareto.py --n 65536 --heads 40 --workload diffuse --modes fixed adaptive --no-fixed-grid --fixed-defaults --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 --adaptive-alpha-s 1.0 0.5 --adaptive-masses 0.7 0.8 0.9 0.95 --out "$OUT/pareto_diffuse"
  ;;
l)
  run gpu_tests_kmeans 260 python -m pytest -q -m gpu tests/kernels/test_sparse_attn_gpu.py tests/executors tests/test_attention_gpu.py -p no:cacheprovider -n 4
  run sparse_bench_kmeans 200 python benchmarks/bench_sparse_executor.py --blocks 128 --sparsity 0.5 0.75 0.9 --pseudo 128:mean 16:mean 16:kmeans 32:kmeans --json "$OUT/sparse_bench_kmeans.json"
  run profile_plan_kmeans 60 python benchmarks/profile_plan.py --n 65536 --heads 40 --config '{"mode": "adaptive", "mass": 0.7, "alpha_s": 1.0, "block_size": 128, "pseudo_block": 16, "pseudo_keys": "kmeans"}'
  ;;
m)
  for w in structured diffuse; do
    run "pareto_kmeans_$w" 250 python benchmarks/bench_pareto.py --n 65536 --heads 40 --workload $w --modes adaptive --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 32 16 --adaptive-pseudo-keys kmeans --adaptive-alpha-s 1.0 --adaptive-masses 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --out "$OUT/pareto_kmeans_$w"
  done
  ;;
n)
  run gpu_suite 330 python -m pytest -q -m gpu tests -p no:cacheprovider -n 8
  cp isa_plugin/kernels/cost_model.json "$OUT/cost_model.json"
  run executor_costs_kmeans 230 python benchmarks/bench_pareto.py --n 65536 --heads 40 --modes fixed adaptive --no-fixed-grid --fixed-defaults --fixed-executors triton sparse --adaptive-block-sizes 128 --adaptive-pseudo-blocks 128 32 16 --adaptive-pseudo-keys kmeans --adaptive-alpha-s 1.0 --adaptive-masses 0.3 0.5 0.7 0.9 --executor-costs "$OUT/cost_model.json" --out "$OUT/executor_costs_kmeans"
  ;;
o)
  run calibration_ltx2_fixed 150 python benchmarks/bench_calibration_family.py --mode fixed --json "$OUT/calibration_ltx2_fixed.json"
  run calibration_ltx2_both 200 python benchmarks/bench_calibration_family.py --mode fixed --mode adaptive --json "$OUT/calibration_ltx2_both.json"
  ;;
*) echo "usage: $0 a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|part1|part2"; exit 2 ;;
esac
