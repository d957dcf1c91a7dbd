"""Where the time of one calibration measurement goes: ``CalibrationStats.observe`` of one attention call, per mode
grid, timed and profiled (torch.profiler), against dense SDPA of the same q, k, v.

    python benchmarks/profile_calibration.py --n 12288 --heads 32        # on a GPU (LTX-2's per-entry shape)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.calibration.statistics import CalibrationStats, Grid  # noqa: E402
from isa_plugin.calibration.synthetic import synthetic_qkv  # noqa: E402
from isa_plugin.selection.adaptive import ADAPTIVE_MASS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v, layout = synthetic_qkv(a.frames, a.height, a.width, a.heads, head_dim=128, layer_depth=0.5, sample_seed=0,
                                    device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def timed(fn):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        sync()
        return (time.perf_counter() - t) / a.reps

    dense = timed(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
    print(f"N={q.shape[1]} H={a.heads} D=128 {dtype} on {dev}: dense SDPA {dense * 1e3:.2f} ms")
    for name, grid in (("fixed", Grid()), ("adaptive", Grid(["adaptive"], mass=ADAPTIVE_MASS))):
        st = CalibrationStats(grid)
        ms = timed(lambda: st.observe("l", q, k, v, layout, sample=0)) * 1e3
        print(f"{name}: observe {ms:.1f} ms = {ms / (dense * 1e3):.2f}x dense")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                    + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])) as p:
            st.observe("l", q, k, v, layout, sample=0)
            sync()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=a.rows))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
