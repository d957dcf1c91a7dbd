"""The fit's solver: rank one mode's candidate table of a layer under an error budget.

:func:`mode_candidates` proposes, from a :class:`~isa_plugin.selection.CandidateTable`, the cheapest
layer-wide setting of each candidate group whose errors meet the budget, and per-head settings found by
:func:`lagrange` (a Lagrangian relaxation of the two budget constraints over every head's options, exact
attention included). :func:`~isa_plugin.calibration.fit.fit_profile` keeps the cheapest proposal of all
modes.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from ..config import ISAConfig
from ..layer_setting import LayerSetting

__all__ = ["lagrange", "mode_candidates", "layer_errors"]


def lagrange(gt: torch.Tensor, gc: torch.Tensor, cost: torch.Tensor, bt: float, bc: float):
    """Per-head option choice minimising Σ cost with Σ gt <= bt and Σ gc <= bc (Lagrangian relaxation).

    Args:
        gt, gc, cost: [H, O], each head's share of the layer's target / context error and its cost per option.
        bt, bc: the target and context budgets.

    Returns:
        ``(choice [H] option indices, error_t, error_c)``, or None when no multiplier is feasible.
    """
    best = None
    for rho in (0.25, 1.0, 4.0):
        pen = rho * gt / max(bt, 1e-12) + gc / max(bc, 1e-12)  # [H, O]

        def solve(lam):
            ch = torch.argmin(cost + lam * pen, dim=1)
            et = float(gt.gather(1, ch[:, None]).sum())
            ec = float(gc.gather(1, ch[:, None]).sum())
            return ch, et, ec, float(cost.gather(1, ch[:, None]).sum())

        lo, hi = -6.0, 8.0  # log10 lambda
        ch, et, ec, c = solve(10**hi)
        if et > bt + 1e-12 or ec > bc + 1e-12:
            continue
        found = (ch, et, ec, c)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            ch, et, ec, c = solve(10**mid)
            if et <= bt + 1e-12 and ec <= bc + 1e-12:
                hi, found = mid, (ch, et, ec, c)
            else:
                lo = mid
        if best is None or found[3] < best[3]:
            best = found
    if best is None:
        return None
    ch, et, ec, _ = best
    return ch, et, ec


def layer_errors(table) -> torch.Tensor:
    """[2, C] layer-level relative L1 of every candidate (target, context); 0 for a kind without queries."""
    den = table.den.sum(0)  # [2]
    has = den > 0
    return torch.where(has.view(2, 1), table.num.sum(0) / den.clamp(min=1e-300).view(2, 1), torch.zeros(()).double())


def mode_candidates(mode, grid, table, heads: int, bt: float, bc: float, dense_layer: float, floor: float,
                    per_head: Union[bool, str], min_gain: float, block_size: int = 64) -> List[Tuple[float, float, LayerSetting]]:
    """One mode's proposals for a layer as (relative cost, error score, setting).

    Layer-wide: per uniform group, the cheapest candidate (then the lowest error score) whose layer errors
    meet ``(bt, bc)``. Per head (``per_head``, more than one head, and a mode with per-head settings): per head group, a :func:`lagrange`
    choice over every head's candidates of the group plus exact attention, kept when ``per_head == "always"``
    or it cuts the best layer-wide cost of the mode by more than ``min_gain``.
    """
    H = heads
    err = layer_errors(table)
    cost = table.cost
    per_head_cost = cost.ndim == 2
    total = cost.sum(0) if per_head_cost else H * cost
    rel_u = (total + table.call_cost).clamp(min=floor) / dense_layer  # [C]
    score_all = err[0] / max(bt, 1e-12) + err[1] / max(bc, 1e-12)
    out = []
    uniform_best = None
    for g in table.uniform_groups:
        et, ec = err[0, g], err[1, g]
        ok = (et <= bt + 1e-12) & (ec <= bc + 1e-12)
        if not bool(ok.any()):
            continue
        rel, score = rel_u[g], score_all[g]
        key = torch.where(ok, rel * 1e6 + score.clamp(max=1e5) * 1e-6, torch.full_like(rel, math.inf))
        i = int(torch.argmin(key))
        c = int(g[i])
        s = LayerSetting(ISAConfig(mode.name, block_size=block_size, **mode.settings_for(grid, [c] * H)), error_target=float(et[i]), error_context=float(ec[i]),
                         relative_cost=float(rel[i]))
        out.append((float(rel[i]), float(score[i]), s))
        uniform_best = float(rel[i]) if uniform_best is None else min(uniform_best, float(rel[i]))
    if not (per_head and H > 1 and mode.per_head_fields):  # a mode without per-head settings gets one per layer
        return out
    uniform_best = 1.0 if uniform_best is None else uniform_best
    den = table.den.sum(0)
    for g in table.head_groups:
        n_opt = len(g)
        gt = torch.zeros(H, n_opt + 1, dtype=torch.float64)
        gc = torch.zeros(H, n_opt + 1, dtype=torch.float64)
        if bool(den[0] > 0):
            gt[:, :n_opt] = table.num[:, 0, g] / float(den[0])
        if bool(den[1] > 0):
            gc[:, :n_opt] = table.num[:, 1, g] / float(den[1])
        head_cost = cost[:, g] if per_head_cost else cost[g].expand(H, n_opt)
        opts = torch.cat([head_cost, torch.full((H, 1), table.dense_head, dtype=torch.float64)], 1)
        found = lagrange(gt, gc, opts / table.dense_head, bt, bc)
        if found is None:
            continue
        ch, et, ec = found
        choice = [(-1 if int(o) == n_opt else int(g[int(o)])) for o in ch]
        total_h = sum(table.dense_head if int(o) == n_opt else float(head_cost[h, int(o)]) for h, o in enumerate(ch))
        rel = max(floor, total_h + table.call_cost) / dense_layer
        if not (per_head == "always" or rel < uniform_best * (1 - min_gain)):
            continue
        eth, ech = [], []
        for h, c in enumerate(choice):
            if c < 0:
                eth.append(0.0), ech.append(0.0)
                continue
            d0, d1 = float(table.den[h, 0]), float(table.den[h, 1])
            eth.append(float(table.num[h, 0, c]) / d0 if d0 > 0 else 0.0)
            ech.append(float(table.num[h, 1, c]) / d1 if d1 > 0 else 0.0)
        s = LayerSetting(ISAConfig(mode.name, block_size=block_size, **mode.settings_for(grid, choice)), error_target=et, error_context=ec, relative_cost=rel,
                         error_target_per_head=tuple(eth), error_context_per_head=tuple(ech))
        out.append((rel, et / max(bt, 1e-12) + ec / max(bc, 1e-12), s))
    return out
