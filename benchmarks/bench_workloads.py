"""Calibrated cost of ISA's fixed and adaptive modes on the two synthetic workloads (structured, diffuse).

For each workload of :data:`~isa_plugin.calibration.synthetic.WORKLOADS` at one shape (default: 8 frames of
16 × 16 tokens per video, N = 4,096, 4 heads, D = 64, 3 layers; CPU, float32):

1. how diffuse its attention is: per layer, the mean normalised entropy of the pooled rows (block means,
   b = 64) and the mass of their top 10% key blocks, for target and context query blocks, on one sample;
2. ``calibrate_synthetic`` on calibration samples (default 0, 1) twice: with ``Grid()`` (the fixed mode
   alone) and with ``Grid(mass=ADAPTIVE_MASS)`` (both modes; each layer keeps the cheaper one);
3. ``fit_profile`` at the budget (default 0.05, pair-count cost model, leave-one-sample-out check);
4. ``evaluate_synthetic`` on held-out samples (default 100, 101): relative L1 error of all target-query and
   context-query outputs against dense attention, and the plans' relative cost ((exact + pseudo pairs) / N²).

Prints one table row per (workload, layer), the means and the settings chosen, and writes
``workloads_<frames>x<height>x<width>[_seed<seed>].json`` and ``.md`` to ``--out``.

Example:
    python benchmarks/bench_workloads.py                    # 1-3 minutes on 2 CPU cores
    python benchmarks/bench_workloads.py --width 32         # N = 8,192 (~3 minutes)
    python benchmarks/bench_workloads.py --seed 1           # another model
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from workload_study import add_workload_args, set_threads, workload_model  # noqa: E402
from isa_plugin.calibration.fit import fit_profile  # noqa: E402
from isa_plugin.calibration.statistics import Grid  # noqa: E402
from isa_plugin.calibration.synthetic import (  # noqa: E402
    SyntheticModel,
    calibrate_synthetic,
    evaluate_synthetic,
    pooled_attention,
)
from isa_plugin.selection.adaptive import ADAPTIVE_MASS  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "2026-12-05-cpu-workloads")


def diffuseness(model: SyntheticModel, sample: int, block_size: int = 64):
    """Per layer: mean normalised entropy and top-10% block mass of pooled rows, target / context query blocks."""
    out = []
    for layer in range(model.spec.layers):
        q, k, _, layout = model.sample(layer, sample)
        p = pooled_attention(q, k, layout, block_size)[0]  # [H, nb, nb]
        kinds = layout.blocks(block_size).kinds
        nb = p.shape[-1]
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(nb)  # [H, nb]
        top = p.topk(max(1, nb // 10), -1).values.sum(-1)  # [H, nb]
        row = {}
        for name, kid in (("target", 0), ("context", 1)):
            sel = kinds == kid
            row[f"entropy_{name}"] = float(ent[:, sel].mean())
            row[f"top10_{name}"] = float(top[:, sel].mean())
        out.append(row)
    return out


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):  # per head
        return f"{min(value):g}–{max(value):g}/head" if len(set(value)) > 1 else f"{value[0]:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def profile_modes(model: SyntheticModel, profile):
    """Per layer: the mode of its configuration ("dense" for a layer left dense) and its settings, as text."""
    modes, settings = {}, {}
    for name in model.layer_names:
        cfg = profile.config_for(name)
        if cfg is None:
            modes[name], settings[name] = "dense", ""
            continue
        mode = getattr(cfg, "mode", "fixed")
        keys = ("alpha_s", "mass", "context_mass", "pseudo_block") if mode == "adaptive" else ("alpha_s", "alpha_f", "alpha_ns")
        parts = []
        for key in keys:
            value = getattr(cfg, key, getattr(getattr(cfg, "settings", None), key, None))
            if value is not None:
                parts.append(f"{key} {_fmt(value)}")
        modes[name], settings[name] = mode, ", ".join(parts)
    return modes, settings


def run_workload(name: str, a) -> dict:
    model = workload_model(name, a)
    spec = model.spec
    t0 = time.perf_counter()
    shape = diffuseness(model, a.held_out[0])
    result = {"workload": name, "spec": asdict(spec), "tokens": 2 * spec.tokens_per_video, "diffuseness": shape,
              "modes": {}}
    for mode, grid in (("fixed", Grid()), ("adaptive", Grid(mass=ADAPTIVE_MASS))):
        t = time.perf_counter()
        stats = calibrate_synthetic(model, a.samples, grid=grid, blocks_per_kind=a.blocks_per_kind,
                                    tokens_per_block=a.tokens_per_block)
        t_cal = time.perf_counter() - t
        t = time.perf_counter()
        profile = fit_profile(stats, a.budget)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        held = evaluate_synthetic(model, profile, a.held_out)
        t_eval = time.perf_counter() - t
        layer_modes, layer_settings = profile_modes(model, profile)
        result["modes"][mode] = {"summary": profile.summary(), "layer_modes": layer_modes, "layer_settings": layer_settings,
                                 "held_out": held, "seconds": {"calibrate": t_cal, "fit": t_fit, "evaluate": t_eval}}
    result["seconds"] = time.perf_counter() - t0
    return result


def table(results) -> str:
    lines = ["| workload | layer | entropy t/c | top-10% mass t/c | fixed cost | fixed err t/c | both modes: layer's mode | "
             "cost | err t/c |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fx, ad = r["modes"]["fixed"], r["modes"]["adaptive"]
        for i, name in enumerate(fx["held_out"]):
            d = r["diffuseness"][i]
            f, g = fx["held_out"][name], ad["held_out"][name]
            lines.append(f"| {r['workload']} | {i} | {d['entropy_target']:.2f}/{d['entropy_context']:.2f} | "
                         f"{d['top10_target']:.2f}/{d['top10_context']:.2f} | {f['relative_cost']:.3f} | "
                         f"{f['error_target']:.3f}/{f['error_context']:.3f} | {ad['layer_modes'][name]} | "
                         f"{g['relative_cost']:.3f} | {g['error_target']:.3f}/{g['error_context']:.3f} |")
        mf = sum(x["relative_cost"] for x in fx["held_out"].values()) / len(fx["held_out"])
        ma = sum(x["relative_cost"] for x in ad["held_out"].values()) / len(ad["held_out"])
        pf, pa = fx["summary"]["mean_relative_cost"], ad["summary"]["mean_relative_cost"]
        lines.append(f"| {r['workload']} | mean | | | {mf:.3f} (profile {pf:.3f}) | | | {ma:.3f} (profile {pa:.3f}) | "
                     f"{ma / mf:.2f}× fixed |")
    lines += ["", "Settings chosen per layer (fixed-mode profile; profile with both modes offered):", ""]
    for r in results:
        fx, ad = r["modes"]["fixed"], r["modes"]["adaptive"]
        for i, name in enumerate(fx["held_out"]):
            desc = [f"{x['layer_modes'][name]}" + (f" ({x['layer_settings'][name]})" if x["layer_settings"][name] else "")
                    for x in (fx, ad)]
            lines.append(f"- {r['workload']} layer {i}: {desc[0]}; {desc[1]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    set_threads(a)
    t0 = time.perf_counter()
    results = []
    for name in a.workloads:
        results.append(run_workload(name, a))
        print(f"{name}: {results[-1]['seconds']:.0f} s", flush=True)
    md = table(results)
    total = time.perf_counter() - t0
    cmd = "python benchmarks/bench_workloads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"`{cmd.strip()}` (torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
            f"{datetime.date.today().isoformat()}, {total:.0f} s)")
    print(head)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"workloads_{a.frames}x{a.height}x{a.width}" + (f"_seed{a.seed}" if a.seed else ""))
    with open(stem + ".md", "w") as f:
        f.write(head + "\n\n" + md + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "seconds": total, "args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
