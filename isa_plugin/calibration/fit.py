"""Choose per-layer (and per-head) ISA ratios from calibration statistics: :func:`fit_profile`."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..layer_setting import LayerSetting
from ..profile import ThresholdProfile, library_versions
from ..selection import get_mode
from ..validation import validate_budget
from .cost import DEFAULT_COST_MODEL, CostModel
from .heldout import fit_generalising
from .solver import mode_candidates
from .statistics import CalibrationStats, Grid, LayerErrorStats

__all__ = ["fit_profile", "parse_budget", "fit_layer"]

logger = logging.getLogger(__name__)

BudgetArg = Union[float, Tuple[float, float], Mapping[str, float]]


def parse_budget(budget: BudgetArg) -> Dict[str, Any]:
    """The profile's budget record from ``budget``: one number, ``(target, context)`` or a mapping.

    ``0.05`` -> both query kinds 0.05; ``(t, c)`` or ``{"target": t, "context": c}`` -> separate budgets.
    Each number is checked by :func:`isa_plugin.validation.validate_budget`.

    Args:
        budget: relative L1 error budget(s) of the attention output, each in (0, 1).

    Returns:
        ``{"metric": "rel_l1", "target": float, "context": float}``.

    Raises:
        ValueError: a budget outside (0, 1) or not a number, or a sequence that is not a pair.

    Example:
        >>> parse_budget((0.05, 0.2))
        {'metric': 'rel_l1', 'target': 0.05, 'context': 0.2}
    """
    if isinstance(budget, Mapping):
        t, c = budget.get("target"), budget.get("context", budget.get("target"))
    elif isinstance(budget, (tuple, list)):
        if len(budget) != 2:
            raise ValueError(f"budget={budget!r} must be one number or a pair (target, context), e.g. 0.05")
        t, c = budget
    else:
        b = validate_budget(budget)
        return {"metric": "rel_l1", "target": b, "context": b}
    return {"metric": "rel_l1", "target": validate_budget(t, "target budget"), "context": validate_budget(c, "context budget")}


def fit_layer(ls: LayerErrorStats, grid: Grid, budget: Dict[str, Any], cost_model: CostModel, per_head: Union[bool, str],
              margin: float, min_gain: float, block_size: int = 64) -> LayerSetting:
    """The cheapest setting of any measured mode whose layer errors meet ``margin × budget`` (dense when none
    does, or none is predicted to be faster than dense attention)."""
    bt, bc = budget["target"] * margin, budget["context"] * margin
    n = sum(ls.mean_tokens().values())
    dense_layer = cost_model.dense_time(n, ls.heads, ls.head_dim)
    best: Optional[Tuple[float, float, LayerSetting]] = None
    for name, g in grid.modes.items():
        mode = get_mode(name)
        table = mode.candidates(ls.modes[name], g, ls, cost_model)
        for rel, score, setting in mode_candidates(mode, g, table, ls.heads, bt, bc, dense_layer, cost_model.floor,
                                                   per_head, min_gain, block_size):
            if best is None or (rel, score) < (best[0], best[1]):
                best = (rel, score, setting)
    if best is None or best[0] >= 1.0:
        return LayerSetting(dense=True, error_target=0.0, error_context=0.0, relative_cost=1.0)
    return best[2]


def fit_profile(stats: CalibrationStats, budget: BudgetArg = 0.05, cost_model: Optional[CostModel] = None, *,
                per_head: Union[bool, str] = "auto", margin: float = 0.85, min_gain: float = 0.02,
                metadata: Optional[Mapping[str, Any]] = None, held_out: bool = True,
                bucket_budgets: Optional[Sequence[BudgetArg]] = None) -> ThresholdProfile:
    """Pick, per layer (and timestep bucket), the cheapest ISA setting whose errors stay within budget.

    A pure function of its arguments. Every mode the statistics measured (``stats.grid.modes``) proposes
    candidates from its own table (:meth:`SelectionMode.candidates <isa_plugin.selection.SelectionMode.candidates>`):
    the cheapest layer-wide setting of each group within budget and — when ``per_head`` — per-head settings
    (a Lagrangian search over each head's options, dense included, subject to the *layer's* target-query and
    context-query errors; :mod:`~isa_plugin.calibration.solver`), kept only when they cut the predicted cost
    by more than ``min_gain``. The cheapest proposal of any mode wins the layer (then the lowest error); a
    layer stays dense when none meets the budget or none is predicted to be faster.

    Args:
        stats: :class:`CalibrationStats` from a calibration run (or synthetic statistics).
        budget: relative L1 error budget of the attention output: one number for target and context
            queries, ``(target, context)``, or ``{"target": t, "context": c}``.
        cost_model: kernel-time model; None counts token pairs (:data:`DEFAULT_COST_MODEL`). Pass
            :func:`~isa_plugin.calibration.load_cost_model` for the kernel benchmark's per-GPU model.
        per_head: ``"auto"`` (per head where it pays), ``"always"``, or False.
        margin: fit to ``margin × budget`` to leave room for sampling noise (1 = none); with
            ``held_out``, the starting margin.
        min_gain: relative cost reduction per-head ratios must bring over the best layer-wide setting.
        metadata: merged into the profile's ``calibrated_on`` (transformer class, config hash, ...).
        held_out: when the statistics hold two or more samples (``CalibrationStats.observe(..., sample=i)``),
            check every layer leave-one-sample-out and tighten its margin until the held-out errors meet
            the budget (else the layer stays dense). ``calibrated_on["held_out"][layer][bucket]`` records
            the predicted and held-out errors and the margin used.
        bucket_budgets: one budget per timestep bucket (each as ``budget``; bucket 0 holds the smallest
            timesteps, the last one the noisiest steps), fitted instead of ``budget`` in that bucket and
            recorded in ``calibrated_on["bucket_budgets"]``. Spending more of the budget at high noise keeps
            the edit closer to the dense one at the same cost (docs/ADAPTIVE.md, lever (e)).

    Returns:
        A :class:`ThresholdProfile`.

    Raises:
        ValueError: a bad budget, ``bucket_budgets`` whose length is not the statistics' number of timestep
            buckets, or statistics without any measured layer.

    Example:
        >>> profile = fit_profile(stats, budget=0.05, cost_model=load_cost_model())
        >>> profile.save("profile.yaml")
    """
    b = parse_budget(budget)
    per_bucket_budget = [b] * stats.num_buckets
    if bucket_budgets is not None:
        if isinstance(bucket_budgets, (str, bytes)) or not isinstance(bucket_budgets, Sequence) or len(bucket_budgets) != stats.num_buckets:
            raise ValueError(f"bucket_budgets={bucket_budgets!r} must give one budget per timestep bucket "
                             f"({stats.num_buckets}, from the least noisy to the noisiest)")
        per_bucket_budget = [parse_budget(x) for x in bucket_budgets]
    if not (0 < margin <= 1):
        raise ValueError(f"margin={margin!r} must lie in (0, 1]")
    if per_head not in (True, False, "auto", "always"):
        raise ValueError(f"per_head={per_head!r}; use 'auto', 'always' or False")
    cm = cost_model or DEFAULT_COST_MODEL
    names = stats.layer_names()
    if not names:
        raise ValueError("the calibration statistics hold no measured attention call; was the layout known and did the run reach the sampled steps?")
    layers: Dict[str, List[LayerSetting]] = {}
    checks: Dict[str, List[Optional[Dict[str, Any]]]] = {}
    for name in names:
        per_bucket, per_check = [], []
        for bucket in range(stats.num_buckets):
            ls = stats.get(name, bucket)
            if ls is None or not ls.measured:
                per_bucket.append(LayerSetting(dense=True))
                per_check.append(None)
                continue
            samples = {i: stats.get(name, bucket, sample=i) for i in stats.sample_ids(name, bucket)} if held_out else {}
            bb = per_bucket_budget[bucket]
            fit_at = lambda st, m, bb=bb: fit_layer(st, stats.grid, bb, cm, per_head, m, min_gain, stats.block_size)  # noqa: E731
            setting, check = fit_generalising(ls, samples, stats.grid, bb, fit_at, margin)
            per_bucket.append(setting)
            per_check.append(dict(check, predicted_target=setting.error_target, predicted_context=setting.error_context))
        layers[name] = per_bucket
        checks[name] = per_check
    diagnostics = {}
    for name in names:
        ls = stats.get(name, 0)
        if ls is None:
            continue
        diag: Dict[str, Any] = {}
        for n, g in stats.grid.modes.items():
            diag.update(get_mode(n).diagnostics(ls.modes[n], g, ls.calls))
        diagnostics[name] = diag
    on = {
        "layer_names": names,
        "timesteps": list(stats.meta.get("timesteps", [])),
        "attention_calls": int(stats.meta.get("calls", 0)),
        "grid": stats.grid.to_dict(),
        "margin": margin,
        # per layer and timestep bucket: predicted (in-sample) and leave-one-sample-out errors, final margin
        "held_out": checks,
        "versions": library_versions(),
        "diagnostics": diagnostics,
    }
    if bucket_budgets is not None:
        on["bucket_budgets"] = [{"target": x["target"], "context": x["context"]} for x in per_bucket_budget]
    on.update(dict(metadata or {}))
    return ThresholdProfile(layers=layers, budget=b, block_size=stats.block_size, timestep_edges=stats.timestep_edges,
                            calibrated_on=on, cost_model=cm.to_dict())
