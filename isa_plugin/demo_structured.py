"""The demo's view of ISA at a realistic size: one structured ICL attention call, and the GPU speed.

The tiny demo pipeline has 360 tokens per attention call, too few for ISA's blocks to mean much. This module
adds what a user needs to judge ISA, all of it cheap on a CPU:

- :func:`structured_call`: the package's synthetic ICL workload (:mod:`isa_plugin.calibration.synthetic`,
  2,048 tokens per call: 4 frames of 16 × 16 latent tokens for the target and for the context video) —
  the plan of the default ratios over the target/context block grid (kept context blocks, the query blocks
  computed exactly), and the held-out error and FLOPs of the default ratios and of profiles calibrated on
  other samples with the fixed mode only and with the fixed and adaptive modes;
- :func:`gpu_speed`: the kernels' speed as the repository measured it (``data/gpu_speed.json``, from
  BENCHMARKS.md), or, where a CUDA GPU is present, measured on it.
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .calibration.synthetic import SyntheticModel, SyntheticSpec

__all__ = ["STRUCTURED_SPEC", "structured_call", "plan_grid", "gpu_speed", "recorded_gpu_speed", "GPU_SPEED_PATH"]

logger = logging.getLogger(__name__)

#: the structured call: 2 × 4 × 16 × 16 = 2,048 tokens, 4 heads of 64, two layers (a shallow and a deep one)
STRUCTURED_SPEC = SyntheticSpec(frames=4, height=16, width=16, heads=4, head_dim=64, layers=2)
#: samples the profiles are calibrated on, and the held-out samples every setting is evaluated on
CALIBRATION_SAMPLES = (0, 1)
HELD_OUT_SAMPLES = (2,)
#: the calibration grid (a subset of the modes' default grids, to keep the demo's CPU time short)
GRID_ALPHA_S = (0.125, 0.5, 1.0)
GRID_MASS = (0.8, 0.9, 0.95)
GRID_PSEUDO_BLOCK = (16, 64)
#: the settings compared: name -> what the name means
SETTINGS = {
    "default": "default ratios (α_s 0.125, α_f 0.5, α_ns 0.0625), not calibrated",
    "fixed": "calibrated, fixed mode",
    "adaptive": "calibrated, fixed + adaptive modes",
}
#: cells of :func:`plan_grid`
DROPPED, PSEUDO, EXACT = 0, 1, 2

GPU_SPEED_PATH = Path(__file__).with_name("data") / "gpu_speed.json"


class _SampleCache(SyntheticModel):
    """A :class:`SyntheticModel` that draws each (layer, sample) once: calibrating two grids and evaluating three
    settings reuse the same q, k, v."""

    def __init__(self, spec: SyntheticSpec, seed: int):
        super().__init__(spec, seed)
        self._cache: Dict[Tuple, Tuple] = {}

    def sample(self, layer, sample_seed, **kw):
        key = (layer, sample_seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in self._cache:
            self._cache[key] = super().sample(layer, sample_seed, **kw)
        return self._cache[key]


def plan_grid(plan, batch: int = 0, head: int = 0) -> torch.Tensor:
    """[nb, nb] int8 cells of one (batch entry, head) of a :class:`~isa_plugin.plan.BlockPlan`: query block i
    (row) and key block j (column) are :data:`EXACT` (computed exactly), :data:`PSEUDO` (the kept key block enters
    as pseudo-keys) or :data:`DROPPED` (a context block not kept)."""
    exact = plan.exact_mask()[batch, head]
    keep = plan.kv_keep[batch, head]
    cells = torch.full(exact.shape, DROPPED, dtype=torch.int8)
    cells[keep[None, :].expand_as(exact).cpu()] = PSEUDO
    cells[exact.cpu()] = EXACT
    return cells


def _plan_summary(plan, layout, head: int) -> Dict[str, Any]:
    """What the plan of one call decided: per head and for the drawn ``head`` (its cells, row by row)."""
    from .layout import CONTEXT, TARGET

    blocks = plan.blocks
    kinds = blocks.kinds.cpu()
    is_ctx, is_tgt = kinds == CONTEXT, kinds == TARGET
    keep, full, counts = plan.kv_keep[0].cpu(), plan.full_rows[0].cpu(), plan.exact_counts()[0].cpu()
    return {
        "tokens": {kind: int(n) for kind, n in layout.spans},
        "block_size": blocks.block_size,
        "blocks": {"target": int(is_tgt.sum()), "context": int(is_ctx.sum())},
        "block_kinds": ["target" if k == TARGET else "context" if k == CONTEXT else "text" for k in kinds.tolist()],
        "relative_cost": plan.relative_cost(),
        "per_head": {
            "kept_context_blocks": keep[:, is_ctx].sum(-1).tolist(),
            "full_rows_target": full[:, is_tgt].sum(-1).tolist(),
            "full_rows_context": full[:, is_ctx].sum(-1).tolist(),
            "mean_exact_blocks": counts.double().mean(-1).tolist(),
        },
        "head": head,
        "kv_keep": keep[head].int().tolist(),
        "full_rows": full[head].int().tolist(),
        "exact_counts": counts[head].tolist(),
        "cells": plan_grid(plan, 0, head).tolist(),
    }


def _l1_sums(out: torch.Tensor, dense: torch.Tensor, layout, block_size: int) -> List[Tuple[float, float]]:
    """(Σ|out − dense|, Σ|dense|) over the target queries and over the context queries ([1, N, H, D] each)."""
    from .layout import CONTEXT, TARGET

    blocks = layout.blocks(block_size)
    kinds = blocks.kinds[blocks.token_block]
    return [(float((out - dense)[0, kinds == kind].abs().sum()), float(dense[0, kinds == kind].abs().sum()))
            for kind in (TARGET, CONTEXT)]


def _evaluate(model: SyntheticModel, configs: Dict[str, Any], samples: Sequence[int]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Held-out error and relative cost of several settings, layer by layer, dense attention computed once per
    (layer, sample) (what :func:`~isa_plugin.calibration.synthetic.evaluate_synthetic` measures for one setting).

    Args:
        configs: name -> a :class:`~isa_plugin.ThresholdProfile` or one :class:`~isa_plugin.ISAConfig` for every layer.

    Returns:
        ``{name: {layer: {"error_target", "error_context", "relative_cost"}}}``.
    """
    from .config import ISAConfig
    from .executors.reference import isa_attention_reference
    from .kernels.reference import dense_attention_reference

    sums = {n: {} for n in configs}
    for layer, lname in enumerate(model.layer_names):
        for s in samples:
            q, k, v, layout = model.sample(layer, s)
            dense = dense_attention_reference(q, k, v).float()
            for name, c in configs.items():
                cfg = c if isinstance(c, ISAConfig) else c.config_for(lname)
                if cfg is None:
                    out, cost = dense, 1.0
                else:
                    out, plan = isa_attention_reference(q, k, v, layout, cfg.replace(backend="reference"), return_plan=True)
                    out, cost = out.float(), plan.relative_cost()
                acc = sums[name].setdefault(lname, {"num": [0.0, 0.0], "den": [0.0, 0.0], "cost": []})
                for i, (num, den) in enumerate(_l1_sums(out, dense, layout, cfg.block_size if cfg else 64)):
                    acc["num"][i] += num
                    acc["den"][i] += den
                acc["cost"].append(cost)
    return {name: {lname: {"error_target": a["num"][0] / max(a["den"][0], 1e-30),
                           "error_context": a["num"][1] / max(a["den"][1], 1e-30),
                           "relative_cost": statistics.fmean(a["cost"])} for lname, a in per.items()}
            for name, per in sums.items()}


def _summarise(per_layer: Dict[str, Dict[str, float]], profile, spec: SyntheticSpec) -> Dict[str, Any]:
    """Errors (worst and mean over layers) and FLOPs per call of one setting on the held-out samples."""
    n = 2 * spec.tokens_per_video
    dense_gflop = 4.0 * n * n * spec.heads * spec.head_dim / 1e9  # QK^T and PV, 2 FLOPs per multiply-add
    layers = {}
    for name, r in per_layer.items():
        setting = profile.layers[name][0] if profile is not None else None
        layers[name] = dict(r, gflop=r["relative_cost"] * dense_gflop,
                            mode=("dense" if setting.dense else setting.mode) if setting is not None else "fixed")
    rows = list(layers.values())
    return {
        "error_target": max(r["error_target"] for r in rows),
        "error_context": max(r["error_context"] for r in rows),
        "mean_error_target": statistics.fmean(r["error_target"] for r in rows),
        "mean_error_context": statistics.fmean(r["error_context"] for r in rows),
        "relative_cost": statistics.fmean(r["relative_cost"] for r in rows),
        "gflop_per_call": statistics.fmean(r["gflop"] for r in rows),
        "dense_gflop_per_call": dense_gflop,
        "layers": layers,
    }


def structured_call(budget: float = 0.05, *, seed: int = 0, spec: SyntheticSpec = STRUCTURED_SPEC,
                    calibration_samples: Sequence[int] = CALIBRATION_SAMPLES,
                    held_out_samples: Sequence[int] = HELD_OUT_SAMPLES) -> Dict[str, Any]:
    """Plan, error and FLOPs of ISA on a structured synthetic ICL attention call (seconds on a CPU).

    Args:
        budget: relative L1 error budget the profiles are calibrated for.
        seed: the synthetic model's seed.
        spec: the call's shape (default :data:`STRUCTURED_SPEC`, 2,048 tokens).
        calibration_samples, held_out_samples: sample seeds to calibrate on and to evaluate on (disjoint).

    Returns:
        ``{"spec", "layer", "sample", "plan", "settings", "budget", "calibration_samples", "held_out_samples",
        "grid", "seconds"}``: ``plan`` is the default ratios' plan of the last layer on the first held-out
        sample (``cells`` are :func:`plan_grid`'s, for head ``plan["head"]``; its ``error_target`` /
        ``error_context`` are that layer's over the held-out samples); ``settings`` maps ``default`` /
        ``fixed`` / ``adaptive`` (see :data:`SETTINGS`) to ``{"label", "error_target", "error_context"``
        (worst layer: relative L1 against dense attention over the target / context queries of the held-out
        samples), ``"mean_error_target", "mean_error_context", "relative_cost"`` (mean over layers of
        :meth:`BlockPlan.relative_cost <isa_plugin.plan.BlockPlan.relative_cost>`), ``"gflop_per_call",
        "dense_gflop_per_call", "layers"}``; ``seconds``: wall time of each phase.

    Raises:
        ValueError: calibration and held-out samples that overlap.
    """
    from .calibration.fit import fit_profile
    from .calibration.statistics import Grid
    from .calibration.synthetic import calibrate_synthetic
    from .config import ISAConfig
    from .executors.reference import plan_reference

    if set(calibration_samples) & set(held_out_samples):
        raise ValueError(f"calibration_samples {list(calibration_samples)} and held_out_samples {list(held_out_samples)} overlap")
    seconds, t0 = {}, time.perf_counter()
    model = _SampleCache(spec, seed)
    default = ISAConfig(backend="reference")
    layer, sample = spec.layers - 1, held_out_samples[0]
    q, k, _, layout = model.sample(layer, sample)
    drawn = _plan_summary(plan_reference(q, k, layout, default), layout, head=0)
    seconds["plan"], t0 = time.perf_counter() - t0, time.perf_counter()

    grids = {"fixed": Grid(alpha_s=GRID_ALPHA_S),
             "adaptive": Grid(alpha_s=GRID_ALPHA_S, mass=GRID_MASS, pseudo_block=GRID_PSEUDO_BLOCK)}
    profiles = {"default": None}
    for name, grid in grids.items():
        stats = calibrate_synthetic(model, calibration_samples, grid=grid, block_size=default.block_size, seed=seed)
        profiles[name] = fit_profile(stats, budget)
    seconds["calibration"], t0 = time.perf_counter() - t0, time.perf_counter()
    measured = _evaluate(model, {n: p if p is not None else default for n, p in profiles.items()}, held_out_samples)
    settings = {n: {"label": SETTINGS[n], **_summarise(measured[n], p, spec)} for n, p in profiles.items()}
    drawn.update({k: measured["default"][model.layer_names[layer]][k] for k in ("error_target", "error_context")})
    seconds["evaluation"] = time.perf_counter() - t0
    return {
        "spec": {"frames": spec.frames, "height": spec.height, "width": spec.width, "heads": spec.heads,
                 "head_dim": spec.head_dim, "layers": spec.layers, "tokens_per_call": 2 * spec.tokens_per_video},
        "layer": model.layer_names[layer],
        "sample": sample,
        "plan": drawn,
        "budget": budget,
        "calibration_samples": list(calibration_samples),
        "held_out_samples": list(held_out_samples),
        "grid": {name: g.to_dict() for name, g in grids.items()},
        "settings": settings,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------- GPU speed
def recorded_gpu_speed() -> Dict[str, Any]:
    """The kernels' speed as measured for the repository (``data/gpu_speed.json``): card, date, versions, source
    and rows ``{"heads", "tokens", "dense_ms", "isa_ms", "speedup"}``."""
    return json.loads(GPU_SPEED_PATH.read_text())


def _median_ms(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median CUDA time of ``fn`` in ms (``triton.testing.do_bench`` where Triton is installed)."""
    try:
        import triton.testing
    except ImportError:
        triton = None
    if triton is not None:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure_gpu_speed(device, *, frames: int = 8, height: int = 32, width: int = 64, heads: int = 40,
                      head_dim: int = 128) -> Dict[str, Any]:
    """Time one ISA call (default ratios) against torch SDPA on this GPU, structured synthetic bf16 inputs.

    The default size is 32,768 tokens (target + context), 40 heads of 128, as a row of the recorded table.

    Returns:
        ``{"card", "date", "source": "measured", "versions", "dtype", "rows": [one row], "backend",
        "error_vs_sdpa"}``.
    """
    import torch.nn.functional as F

    from .attention import isa_attention
    from .calibration.synthetic import synthetic_qkv
    from .config import ISAConfig

    q, k, v, layout = synthetic_qkv(frames, height, width, heads, head_dim, device=device, dtype=torch.bfloat16)
    cfg = ISAConfig()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    err = float((out.float() - ref.float()).abs().sum() / ref.float().abs().sum())
    dense_ms = _median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    isa_ms = _median_ms(lambda: isa_attention(q, k, v, layout, cfg))
    versions = {"torch": str(torch.__version__)}
    try:
        import triton

        versions["triton"] = str(triton.__version__)
    except ImportError:
        pass
    return {
        "title": "ISA attention call vs torch SDPA, measured on this machine",
        "card": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "source": "measured",
        "versions": versions,
        "dtype": "bfloat16", "batch": 1, "head_dim": head_dim,
        "ratios": {"alpha_s": cfg.alpha_s, "alpha_f": cfg.alpha_f, "alpha_ns": cfg.alpha_ns},
        "baseline": "torch SDPA, default backend",
        "backend": info.backend,
        "error_vs_sdpa": err,
        "rows": [{"heads": heads, "tokens": 2 * frames * height * width, "dense_ms": dense_ms, "isa_ms": isa_ms,
                  "speedup": dense_ms / isa_ms if isa_ms > 0 else None}],
    }


def gpu_speed(device: torch.device) -> Dict[str, Any]:
    """The GPU speed the demo shows: ``{"recorded": ..., "measured": ... or None, "shown": "recorded" | "measured"}``.

    On a CUDA device the speed is measured there (:func:`measure_gpu_speed`; a failure is logged and the
    recorded table is shown); elsewhere the recorded table (:func:`recorded_gpu_speed`) is shown.
    """
    out: Dict[str, Any] = {"recorded": recorded_gpu_speed(), "measured": None, "shown": "recorded"}
    if torch.device(device).type == "cuda":
        try:
            out["measured"] = measure_gpu_speed(device)
            out["shown"] = "measured"
        except Exception as e:  # a GPU too small or a kernel that cannot run: the recorded table still says something
            logger.warning("could not measure the GPU speed here (%s: %s); showing the recorded table", type(e).__name__, e)
            out["measured_error"] = f"{type(e).__name__}: {e}"
    return out
