"""What the CPU studies of the synthetic workloads share (``bench_workloads.py``, ``bench_levers.py``,
``bench_pseudo_keys.py``, ``bench_query_split.py``): their command-line shape options, the model they build from
them, and (for the lever studies of one plan executed several ways) the per-layer error sums and the report of
the cheapest mass within the budget."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.calibration.synthetic import WORKLOADS, SyntheticModel  # noqa: E402
from isa_plugin.layout import CONTEXT, TARGET  # noqa: E402


def add_workload_args(ap: argparse.ArgumentParser, *, calibration: bool = True) -> None:
    """The workloads, their shape (default 8 frames of 16 x 16 tokens per video, N = 4,096, 4 heads, D = 64,
    3 layers), the model seed, held-out samples, budget and threads; with ``calibration`` also the calibration
    samples and the sampler's density."""
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="model seed")
    if calibration:
        ap.add_argument("--samples", type=int, nargs="+", default=[0, 1], help="calibration samples")
    ap.add_argument("--held-out", type=int, nargs="+", default=[100, 101], help="held-out samples")
    ap.add_argument("--budget", type=float, default=0.05)
    if calibration:
        ap.add_argument("--blocks-per-kind", type=int, default=16)
        ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def set_threads(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)


def workload_model(name: str, a: argparse.Namespace) -> SyntheticModel:
    """The :class:`SyntheticModel` of workload ``name`` at the shape and seed of the parsed options ``a``."""
    spec = replace(WORKLOADS[name], frames=a.frames, height=a.height, width=a.width, heads=a.heads, head_dim=a.head_dim,
                   layers=a.layers)
    return SyntheticModel(spec, seed=a.seed)


class VariantErrors:
    """Per-layer relative L1 error sums of one variant (target and context query rows apart) and its costs."""

    def __init__(self, layers: int):
        self.num = {TARGET: [0.0] * layers, CONTEXT: [0.0] * layers}
        self.den = {TARGET: [0.0] * layers, CONTEXT: [0.0] * layers}
        self.costs: List[float] = []

    def add(self, layer: int, out: torch.Tensor, dense: torch.Tensor, kinds: torch.Tensor) -> None:
        """Add |out − dense|₁ and |dense|₁ of every query kind (``kinds``: [N] span kind of each row)."""
        for kind in (TARGET, CONTEXT):
            sel = kinds == kind
            self.num[kind][layer] += float((out[sel] - dense[sel]).abs().sum())
            self.den[kind][layer] += float(dense[sel].abs().sum())

    def row(self, **keys) -> Dict:
        """``keys`` plus the mean cost and the worst layer's error of each kind."""
        worst = {kind: max(n / d for n, d in zip(self.num[kind], self.den[kind])) for kind in (TARGET, CONTEXT)}
        return dict(keys, cost=sum(self.costs) / len(self.costs), err_t=worst[TARGET], err_c=worst[CONTEXT])


def mass_rows(acc: Dict[str, "VariantErrors"], workload: str, mass: float) -> List[Dict]:
    """One row per variant of one mass (printed as it comes)."""
    rows = []
    for var, errors in acc.items():
        r = errors.row(workload=workload, mass=mass, variant=var)
        print(f"{workload} p={mass} {var}: cost {r['cost']:.3f} worst err t/c {r['err_t']:.4f}/{r['err_c']:.4f}", flush=True)
        rows.append(r)
    return rows


def lever_study_main(description: str, run, variants: Sequence[str], argv=None) -> int:
    """The command line of a lever study: the workload options, ``--block-size``, ``--json``; ``run(workload, a)``
    gives the rows of one workload; the report follows (:func:`report_cheapest`)."""
    ap = argparse.ArgumentParser(description=description)
    add_workload_args(ap, calibration=False)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    set_threads(a)
    rows = [r for w in a.workloads for r in run(w, a)]
    report_cheapest(rows, a, variants)
    return 0


def report_cheapest(rows: Sequence[Dict], a: argparse.Namespace, variants: Sequence[str]) -> None:
    """Print, per workload and variant, the cheapest mass whose worst error is within ``a.budget``; write
    ``a.json`` (the options and every row) when given."""
    print("\n| workload | variant | cheapest within budget: mass | cost | worst err t/c |\n|---|---|---|---|---|")
    for w in a.workloads:
        for var in variants:
            ok = [r for r in rows if r["workload"] == w and r["variant"] == var and max(r["err_t"], r["err_c"]) <= a.budget]
            best = min(ok, key=lambda r: r["cost"]) if ok else None
            print(f"| {w} | {var} | " + (f"{best['mass']} | {best['cost']:.3f} | {best['err_t']:.4f}/{best['err_c']:.4f} |"
                                          if best else "none | – | – |"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": list(rows)}, f, indent=1)
