"""What the CPU studies of the synthetic workloads share (``bench_workloads.py``, ``bench_levers.py``,
``bench_pseudo_keys.py``): their command-line shape options and the model they build from them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.calibration.synthetic import WORKLOADS, SyntheticModel  # noqa: E402


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
