"""Where the time of one ISA call goes: phase timings, host time per call, and torch.profiler kernel tables.

    python benchmarks/profile_isa.py --n 65536 --heads 40 [--alpha-f 0.5] [--exact-backend auto]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.config import ISAConfig  # noqa: E402
from isa_plugin.layout import Layout  # noqa: E402
from isa_plugin.kernels import executor as ex  # noqa: E402
from isa_plugin.executors.triton import isa_attention_kernels  # noqa: E402
from isa_plugin.selection.fixed_gpu import plan_compact  # noqa: E402
from isa_plugin.kernels.pooling import pool_blocks_triton  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import make_input  # noqa: E402


def main():
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--alpha-f", type=float, default=0.5)
    ap.add_argument("--alpha-s", type=float, default=0.125)
    ap.add_argument("--exact-backend", default="auto")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", default=None, help="write a chrome trace of one call here")
    ap.add_argument("--data", default="randn", choices=["randn", "smooth"], help="as in bench_attention.py")
    ap.add_argument("--phases-only", action="store_true", help="skip the torch.profiler tables")
    a = ap.parse_args()
    N, H = a.n, a.heads
    q, k, v = (make_input(N, H, 128, a.data, torch.device("cuda")) for _ in range(3))
    layout = Layout([("target", N // 2), ("context", N - N // 2)])
    cfg = ISAConfig(alpha_s=a.alpha_s, alpha_f=a.alpha_f)
    cp = plan_compact(q, k, layout, cfg, v=v)
    starts, counts, log2n = cp.block_meta
    out = torch.empty_like(q)
    kbar, vbar = cp.pooled_kv
    sc = 128 ** -0.5
    bench = lambda f: triton.testing.do_bench(f, warmup=20, rep=300, return_mode="median")  # noqa: E731

    def full():
        return isa_attention_kernels(q, k, v, layout, cfg, exact_backend=a.exact_backend)

    phases = {
        "plan (pool q,k,v + selections)": lambda: plan_compact(q, k, layout, cfg, v=v),
        "pool q,k,v": lambda: pool_blocks_triton(q, k, v, starts=starts, counts=counts, block_size=cfg.block_size),
        "taylor group": lambda: ex._run_taylor(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, sc),
        "exact group sdpa": lambda: ex._run_exact_sdpa(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, sc, k.numel() * 2),
        "execute (planned)": lambda: ex.execute_compact(q, k, v, cp, exact_backend=a.exact_backend),
        "full call (isa_attention_kernels)": full,
    }
    for name, f in phases.items():
        print(f"{name:36s} {bench(f):8.2f} ms", flush=True)
    import time

    # host cost of one call: issue time of back-to-back calls vs their GPU time; then the host time
    # of one call alone with the GPU idle (what a short call pays when the host is the bottleneck)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        full()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"10 back-to-back calls: {(t2 - t0) * 100:.2f} ms per call (host issue {(t1 - t0) * 100:.2f} ms per call)", flush=True)
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        h0 = time.perf_counter()
        full()
        host.append(time.perf_counter() - h0)
    torch.cuda.synchronize()
    host.sort()
    print(f"host time of one call (GPU idle at start), median of 10: {host[5] * 1e3:.2f} ms", flush=True)
    if a.phases_only:
        return
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        full()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            full()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
