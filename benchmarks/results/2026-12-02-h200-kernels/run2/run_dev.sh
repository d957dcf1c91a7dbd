#!/bin/bash
set -o pipefail
ROOT=$(cd ../.. && pwd); NEW=$(pwd)
export TRITON_CACHE_AUTOTUNING=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'cuda',torch.version.cuda)"; cd $ROOT && git log --oneline -1; } 2>&1 | tee $OUT/env.log
cd $NEW && PYTHONPATH=$NEW timeout 200 python -m pytest -q -m gpu tests/kernels 2>&1 | tail -30 | tee $OUT/tests_gpu.log
cd $NEW && PYTHONPATH=$NEW timeout 75 python benchmarks/bench_attention.py --n 16384 32768 65520 65536 --heads 40 --json $OUT/new.json 2>&1 | tee $OUT/bench_new.log
cd $ROOT && PYTHONPATH=$ROOT timeout 65 python benchmarks/bench_attention.py --n 16384 32768 65520 65536 --heads 40 --no-flash --json $OUT/main.json 2>&1 | tee $OUT/bench_main.log
cd $NEW && PYTHONPATH=$NEW timeout 50 python benchmarks/profile_isa.py --n 65536 --heads 40 --rows 30 2>&1 | tee $OUT/profile_new.log
echo done | tee -a $OUT/env.log
