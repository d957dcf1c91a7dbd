#!/bin/bash
# One device call: environment, GPU tests, benchmark subset. Usage: bash benchmarks/device_run.sh "<bench args>" [pytest-args]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee $OUT/env.txt
python -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/env.txt
if [ -n "$2" ]; then timeout 240 python -m pytest -q -x $2 2>&1 | tee $OUT/tests.log | tail -30; fi
python benchmarks/bench_attention.py $1 --json $OUT/bench.json 2>&1 | tee $OUT/bench.log
