"""Lever study of accuracy per FLOP: per-timestep budgets (more of the error budget at high-noise steps).

Builds the package's tiny Wan in-context edit pipeline (random weights, ``isa_plugin.pipelines.tiny``; 3 layers,
4 heads × 32, block 16), records calibration statistics on the bundled sample video in two timestep buckets
(``record(..., timestep_buckets=2)``: high-noise and low-noise steps). A policy (b_high, b_low) is the profile
``fit_profile(..., bucket_budgets=(b_low, b_high))`` (what ``isa calibrate --bucket-budgets`` fits). Each policy then edits a second video (held out: not the calibration video) end to
end with the same seed as a dense run, and the study reports

- cost: the profile's relative cost (exact + pseudo pairs over dense, from calibration) averaged over layers and
  over the steps of the schedule (each step counted in its bucket);
- latent error: relative L2 and L1 of the final latents against the dense run's.

Uniform policies (b, b) trace the usual front; a per-timestep policy pays if it reaches a lower latent error at
the same cost, or a lower cost at the same latent error.

Usage: ``python benchmarks/bench_timestep_budgets.py [--mode adaptive] [--steps 12] [--json out.json]`` (CPU, a few
minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin import apply_isa, remove_isa  # noqa: E402
from isa_plugin.calibration import fit_profile, record  # noqa: E402
from isa_plugin.calibration.cost import load_cost_model  # noqa: E402
from isa_plugin.calibration.statistics import Grid  # noqa: E402
from isa_plugin.calibration.video import make_sample_video, sample_video_path  # noqa: E402
from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline  # noqa: E402
from isa_plugin.timesteps import bucket_index  # noqa: E402

POLICIES = [(0.03, 0.03), (0.05, 0.05), (0.08, 0.08), (0.12, 0.12), (0.08, 0.03), (0.12, 0.03), (0.12, 0.05), (0.05, 0.03),
            (0.03, 0.08)]


def latents(pipe, video, prompt, kw, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt=prompt, video=video, generator=gen, output_type="latent", **kw)
    return out.frames.float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mode", default="adaptive", choices=["fixed", "adaptive"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = TinyPreset(heads=4, head_dim=32, layers=3, height=128, width=128, frames=9, block_size=16, steps=a.steps)
    pipe = build_tiny_wan_icl_pipeline(preset)
    size = dict(height=128, width=128, frames=9)
    prompt = "make it winter"
    t0 = time.perf_counter()
    stats, meta = record(pipe, [str(sample_video_path())], prompt, steps=a.steps, calib_steps=6, block_size=16,
                         grid=Grid.defaults([a.mode], 16), timestep_buckets=2, **size)
    cm = load_cost_model()
    edges = stats.timestep_edges  # bucket 0: the smaller timesteps (less noise), bucket 1: the noisiest steps
    pipe.scheduler.set_timesteps(a.steps)
    step_buckets = [bucket_index(float(t), edges) for t in pipe.scheduler.timesteps]
    high = max(step_buckets)
    kw = dict(height=128, width=128, num_frames=9, num_inference_steps=a.steps)
    video = make_sample_video(frames=9, height=128, width=128, seed=7)  # held out: not the calibration video
    dense = latents(pipe, video, prompt, kw, a.seed)
    rows = []
    for b_high, b_low in POLICIES:
        prof = fit_profile(stats, b_low, cm, metadata=meta, held_out=False, bucket_budgets=(b_low, b_high))
        layers = prof.layers
        cost = sum(s.relative_cost if s.relative_cost is not None else (1.0 if s.dense else float("nan"))
                   for ss in layers.values() for s in (ss[b] for b in step_buckets)) / (len(layers) * len(step_buckets))
        apply_isa(pipe, prof)
        try:
            out = latents(pipe, video, prompt, kw, a.seed)
        finally:
            remove_isa(pipe)
        d = out - dense
        row = dict(b_high=b_high, b_low=b_low, cost=cost, latent_rel_l2=float(d.norm() / dense.norm()),
                   latent_rel_l1=float(d.abs().sum() / dense.abs().sum()))
        rows.append(row)
        print(f"budget high-noise {b_high} / low-noise {b_low}: cost {cost:.3f}, latent rel L2 {row['latent_rel_l2']:.4f}, "
              f"rel L1 {row['latent_rel_l1']:.4f}", flush=True)
    print(f"tiny Wan ICL ({meta['tokens']} tokens per call), {a.steps} steps ({step_buckets.count(high)} high-noise), "
          f"mode {a.mode}, timestep edges {edges}, {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "edges": list(edges), "step_buckets": step_buckets, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
