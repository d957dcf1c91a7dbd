"""Error of plans reused across denoising steps, on a tiny random Wan ICL pipeline (CPU): what ``isa calibrate
--plan-reuse K`` measures.

Builds the package's tiny Wan in-context edit pipeline (random weights, ``isa_plugin.pipelines.tiny``),
calibrates a profile at the budget on the bundled sample video (``record`` + ``fit_profile``), then runs the
pipeline densely over the whole schedule and measures, per layer, the worst relative L1 error of each
layer's plans executed 0 … K−1 steps after they were made (``measure_plan_reuse``), and the ``plan_reuse``
each layer gets (``choose_plan_reuse``). Prints the table and the choice; ``--json`` writes them.

Usage: ``python benchmarks/bench_plan_reuse.py [--steps 12 --max-reuse 4 --budget 0.05 --mode fixed|adaptive]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.calibration import fit_profile, record  # noqa: E402
from isa_plugin.calibration.cost import load_cost_model  # noqa: E402
from isa_plugin.calibration.plan_reuse import choose_plan_reuse, measure_plan_reuse  # noqa: E402
from isa_plugin.calibration.statistics import Grid  # noqa: E402
from isa_plugin.calibration.video import sample_video_path  # noqa: E402
from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-reuse", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--mode", default="fixed", choices=["fixed", "adaptive"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    preset = TinyPreset(heads=4, head_dim=32, layers=3, height=128, width=128, frames=9, block_size=16, steps=a.steps)
    pipe = build_tiny_wan_icl_pipeline(preset)
    kw = dict(height=128, width=128, frames=9)
    videos, prompt = [str(sample_video_path())], "make it winter"
    t0 = time.perf_counter()
    stats, meta = record(pipe, videos, prompt, steps=a.steps, calib_steps=4, block_size=16,
                         grid=Grid.defaults([a.mode], 16), **kw)
    profile = fit_profile(stats, a.budget, load_cost_model(), metadata=meta, held_out=False)
    errors = measure_plan_reuse(pipe, profile, videos, prompt, max_reuse=a.max_reuse, steps=a.steps, **kw)
    chosen = choose_plan_reuse(profile, errors, a.budget)
    print(f"tiny Wan ICL (3 layers, 4 heads, {meta['tokens']} tokens per call), {a.steps} steps, mode {a.mode}, "
          f"budget {a.budget}, {time.perf_counter() - t0:.0f} s")
    print(errors.table())
    reuse = {n: [s.to_config(profile.block_size).plan_reuse if not s.dense else None for s in ss] for n, ss in chosen.layers.items()}
    print("plan_reuse per layer:", reuse)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "errors": {n: {str(k): v for k, v in e.items()} for n, e in errors.errors.items()},
                       "plan_reuse": reuse}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
