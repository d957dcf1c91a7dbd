"""The held-out check: a setting's error on statistics it was not fitted on, and the margin that passes it."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..layer_setting import LayerSetting
from .statistics import Grid, LayerErrorStats

__all__ = ["setting_errors", "held_out_check", "fit_generalising", "MAX_MARGIN_STEPS", "MARGIN_BISECTIONS"]

#: at most this many margin reductions per layer before the layer is kept dense
MAX_MARGIN_STEPS = 6
#: bisection steps between the last failing and the first passing margin
MARGIN_BISECTIONS = 4


def setting_errors(ls: LayerErrorStats, grid: Grid, setting: LayerSetting) -> Tuple[float, float]:
    """The (target, context) relative L1 error that ``setting`` has on the statistics ``ls``.

    Args:
        ls: one layer's statistics (e.g. of a sample the setting was not fitted on).
        grid: the grid ``ls`` was measured on; the setting's mode must be in it and its values on it, except
            heads computed exactly, which contribute no error.
        setting: a fitted :class:`~isa_plugin.layer_setting.LayerSetting` (uniform or per head).

    Returns:
        ``(error_target, error_context)``; 0 for a kind without queries and for a dense layer.

    Raises:
        ValueError: a mode that was not measured, or settings outside the grid.

    Example:
        >>> setting_errors(stats.get("blocks.0.attn1", sample=2), stats.grid, profile.layers["blocks.0.attn1"][0])  # doctest: +SKIP
        (0.031, 0.042)
    """
    if setting.dense:
        return 0.0, 0.0
    mode = setting.config.selection
    if mode.name not in grid.modes:
        raise ValueError(f"a {mode.name}-mode setting needs statistics measured with that mode (the grid has {list(grid.modes)})")
    from ..calibration.cost import DEFAULT_COST_MODEL

    g = grid.modes[mode.name]
    table = mode.candidates(ls.modes[mode.name], g, ls, DEFAULT_COST_MODEL)
    idx = mode.candidate_index(g, setting.config.settings, ls.heads)
    num = torch.zeros(2, dtype=torch.float64)
    for h, c in enumerate(idx):
        if c >= 0:
            num += table.num[h, :, c]
    den = table.den.sum(0)
    err = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros(()).double())
    return float(err[0]), float(err[1])


def _summed(parts: List[LayerErrorStats]) -> LayerErrorStats:
    out = parts[0].to("cpu").copy()
    for p in parts[1:]:
        out.add_(p)
    return out


def held_out_check(samples: Mapping[int, LayerErrorStats], fit_one: Callable[[LayerErrorStats], LayerSetting],
                   budget: Dict[str, Any], grid: Grid) -> Tuple[float, float]:
    """Leave-one-sample-out errors of a layer: for each sample, the error of the setting fitted on the others.

    Args:
        samples: sample id -> that sample's statistics of the layer (at least two).
        fit_one: ``LayerErrorStats -> LayerSetting``, the fit under test.
        budget, grid: the budget record and the statistics' grid.

    Returns:
        ``(target, context)``: the worst held-out error over the samples.
    """
    worst = [0.0, 0.0]
    ids = sorted(samples)
    for s in ids:
        setting = fit_one(_summed([samples[i] for i in ids if i != s]))
        et, ec = setting_errors(samples[s], grid, setting)
        worst = [max(worst[0], et), max(worst[1], ec)]
    return worst[0], worst[1]


def fit_generalising(ls: LayerErrorStats, samples: Mapping[int, LayerErrorStats], grid: Grid, budget: Dict[str, Any],
                     fit_at: Callable[[LayerErrorStats, float], LayerSetting], margin: float
                     ) -> Tuple[LayerSetting, Dict[str, Any]]:
    """Fit a layer so that it also meets the budget on samples it was not fitted on.

    The margin starts at ``margin``; while the leave-one-sample-out error (:func:`held_out_check`) of
    either query kind exceeds its budget, the margin shrinks by the ratio of budget to held-out error (and
    5% more), up to :data:`MAX_MARGIN_STEPS` times; then the layer stays dense. Once a margin passes after a
    failed one, :data:`MARGIN_BISECTIONS` bisection steps between the two keep the largest margin that passes.
    The final setting is fitted on all samples at the margin that passed.

    Args:
        fit_at: ``(statistics, margin) -> LayerSetting``, the fit.

    Returns:
        ``(setting, record)``; record: ``{"held_out_target", "held_out_context", "margin", "samples"}`` (the
        held-out errors None with fewer than two samples).
    """
    bt, bc = budget["target"], budget["context"]

    def attempt(m):
        fit_one = lambda st: fit_at(st, m)  # noqa: E731
        setting = fit_one(ls)
        if setting.dense or len(samples) < 2:
            return setting, ((0.0, 0.0) if setting.dense and len(samples) >= 2 else (None, None)), True
        held = held_out_check(samples, fit_one, budget, grid)
        return setting, held, held[0] <= bt and held[1] <= bc

    m, failed = margin, None
    for _ in range(MAX_MARGIN_STEPS + 1):
        setting, held, ok = attempt(m)
        if ok:
            break
        failed = m
        m *= 0.95 * min(bt / max(held[0], 1e-12), bc / max(held[1], 1e-12), 1.0)
    else:
        setting, held, failed = LayerSetting(dense=True, error_target=0.0, error_context=0.0, relative_cost=1.0), (0.0, 0.0), None
    if failed is not None:  # the largest passing margin between the last failure and the first pass
        lo, hi = m, failed
        for _ in range(MARGIN_BISECTIONS):
            mid = 0.5 * (lo + hi)
            s_mid, h_mid, ok = attempt(mid)
            if ok:
                lo, setting, held = mid, s_mid, h_mid
            else:
                hi = mid
        m = lo
    rnd = lambda x: None if x is None else round(float(x), 5)  # noqa: E731
    return setting, {"held_out_target": rnd(held[0]), "held_out_context": rnd(held[1]), "margin": round(m, 4),
                     "samples": len(samples)}
