"""Where the planning time of a block-sparse call goes: the kernels of ``Executor.plan`` (pooling, the mode's
selection, the plan's lists) and of the executor's preparation, by torch.profiler, on the Pareto benchmark's
synthetic workload; also the time of executing a kept plan (a step that reuses its layer's plan).

    python benchmarks/profile_plan.py --n 65536 --heads 40 --config '{"mode": "adaptive", "mass": 0.7, "alpha_s": 1.0, "block_size": 128, "pseudo_block": 128}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from isa_plugin.calibration.synthetic import synthetic_qkv  # noqa: E402
from isa_plugin.config import ISAConfig  # noqa: E402
from isa_plugin.execution import get_executor  # noqa: E402

from bench_pareto import SHAPES  # noqa: E402  (the Pareto benchmark's shapes: frames, height, width)


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536, choices=sorted(SHAPES))
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--executor", default="sparse")
    ap.add_argument("--config", default='{"mode": "adaptive", "mass": 0.7, "alpha_s": 1.0, "block_size": 128, "pseudo_block": 128}')
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args(argv)
    cfg = ISAConfig(**json.loads(a.config))
    f, h, w = SHAPES[a.n]
    q, k, v, layout = synthetic_qkv(f, h, w, a.heads, head_dim=128, layer_depth=0.5, sample_seed=1000, device="cuda",
                                    dtype=torch.bfloat16)
    assert q.shape[1] == a.n, (q.shape, a.n)
    ex = get_executor(a.executor)
    scale = 1.0 / math.sqrt(q.shape[-1])
    plan = ex.plan(q, k, v, layout, cfg, scale)
    ex.execute(q, k, v, layout, cfg, scale, plan)
    t_plan = triton.testing.do_bench(lambda: ex.plan(q, k, v, layout, cfg, scale), warmup=10, rep=200, return_mode="median")
    t_call = triton.testing.do_bench(lambda: ex.run(q, k, v, layout, cfg, scale), warmup=10, rep=200, return_mode="median")
    # a kept plan executed on the call's inputs: what a step that reuses its layer's plan (plan_reuse > 1) costs
    t_exec = triton.testing.do_bench(lambda: ex.execute(q, k, v, layout, cfg, scale, plan), warmup=10, rep=200, return_mode="median")
    print(f"{torch.cuda.get_device_name()} N={a.n} H={a.heads} {cfg}: plan {t_plan:.3f} ms, call {t_call:.3f} ms "
          f"({100 * t_plan / t_call:.1f}%), executing a kept plan {t_exec:.3f} ms ({t_call / t_exec:.3f}x faster than planning too)",
          flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ex.run(q, k, v, layout, cfg, scale)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
