"""Choose per-layer (and per-head) ISA ratios from calibration statistics: :func:`fit_profile`."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..config import validate_budget
from ..profile import LayerSetting, ThresholdProfile, library_versions
from .cost import DEFAULT_COST_MODEL, CostModel, setting_pairs
from .measure import CalibrationStats, Grid, LayerErrorStats

__all__ = ["fit_profile", "parse_budget", "layer_costs", "setting_errors", "held_out_check"]

logger = logging.getLogger(__name__)

BudgetArg = Union[float, Tuple[float, float], Mapping[str, float]]


def parse_budget(budget: BudgetArg) -> Dict[str, Any]:
    """The profile's budget record from ``budget``: one number, ``(target, context)`` or a mapping.

    ``0.05`` -> both query kinds 0.05; ``(t, c)`` or ``{"target": t, "context": c}`` -> separate budgets.
    Each number is checked by :func:`isa_plugin.config.validate_budget`.

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


def layer_costs(ls: LayerErrorStats, grid: Grid, cost_model: CostModel) -> Tuple[torch.Tensor, float, float]:
    """Per-head time of every grid setting [S, F, NS], the per-head time of a dense head, and the dense layer time."""
    tokens, blocks = ls.mean_tokens(), ls.mean_blocks()
    n = sum(tokens.values())
    out = torch.empty(len(grid.alpha_s), len(grid.alpha_f), len(grid.alpha_ns), dtype=torch.float64)
    for si, a_s in enumerate(grid.alpha_s):
        for fi, a_f in enumerate(grid.alpha_f):
            for ni, a_ns in enumerate(grid.alpha_ns):
                e, a = setting_pairs(a_s, a_f, a_ns, tokens, blocks)
                out[si, fi, ni] = (cost_model.a * e + cost_model.b * a) * cost_model.dim_scale(ls.head_dim)
    e, a = setting_pairs(1.0, 1.0, 1.0, tokens, blocks)
    dense_head = (cost_model.a * e + cost_model.b * a) * cost_model.dim_scale(ls.head_dim)
    return out, dense_head, cost_model.dense_time(n, ls.heads, ls.head_dim)


def _fit_layer(ls: LayerErrorStats, grid: Grid, budget: Dict[str, Any], cost_model: CostModel, per_head: Union[bool, str],
               margin: float, min_gain: float) -> LayerSetting:
    H = ls.heads
    bt, bc = budget["target"] * margin, budget["context"] * margin
    head_cost, dense_head, dense_layer = layer_costs(ls, grid, cost_model)  # [S, F, NS]
    den = ls.den.sum(0)  # [2]
    has = den > 0
    num = ls.num  # [H, 2, M, S, F, NS]
    # layer-level errors per metric; a kind with no queries has no error
    err = torch.where(has.view(2, 1, 1, 1, 1), num.sum(0) / den.clamp(min=1e-300).view(2, 1, 1, 1, 1), torch.zeros(()).double())
    rel_uniform = (H * head_cost + cost_model.c).clamp(min=cost_model.floor) / dense_layer  # [S, F, NS]
    best: Optional[Tuple[float, float, LayerSetting]] = None

    def consider(rel: float, score: float, setting: LayerSetting):
        nonlocal best
        if best is None or (rel, score) < (best[0], best[1]):
            best = (rel, score, setting)

    # ---- one setting for the whole layer
    for mi, metric in enumerate(grid.metrics):
        et, ec = err[0, mi], err[1, mi]  # [S, F, NS]
        ok = (et <= bt + 1e-12) & (ec <= bc + 1e-12)
        if not bool(ok.any()):
            continue
        score = et / max(bt, 1e-12) + ec / max(bc, 1e-12)
        rel = torch.where(ok, rel_uniform, torch.full_like(rel_uniform, math.inf))
        # cheapest, then lowest error
        key = rel * 1e6 + score.clamp(max=1e5) * 1e-6
        idx = int(torch.argmin(torch.where(ok, key, torch.full_like(key, math.inf))))
        si, fi, ni = (idx // (rel.shape[1] * rel.shape[2])), (idx // rel.shape[2]) % rel.shape[1], idx % rel.shape[2]
        s = LayerSetting(alpha_s=grid.alpha_s[si], alpha_f=grid.alpha_f[fi], alpha_ns=grid.alpha_ns[ni], sharpness=metric,
                         error_target=float(et[si, fi, ni]), error_context=float(ec[si, fi, ni]),
                         relative_cost=float(rel_uniform[si, fi, ni]),
                         error_target_per_head=None, error_context_per_head=None)
        consider(float(rel_uniform[si, fi, ni]), float(score[si, fi, ni]), s)

    # ---- per head (where heads differ), Lagrangian relaxation of the two budget constraints
    if per_head and H > 1:
        uniform_best = best[0] if best is not None else 1.0
        for mi, metric in enumerate(grid.metrics):
            cand = _fit_heads(num[:, :, mi], den, has, head_cost, dense_head, bt, bc)
            if cand is None:
                continue
            choice, et, ec = cand  # choice: [H] option index (-1 dense)
            cost = max(cost_model.floor, sum(dense_head if c < 0 else float(head_cost.flatten()[c]) for c in choice) + cost_model.c)
            rel = cost / dense_layer
            if per_head == "always" or rel < uniform_best * (1 - min_gain):
                S_, F_, N_ = head_cost.shape
                ratios = {"alpha_s": [], "alpha_f": [], "alpha_ns": []}
                eth, ech = [], []
                for h, c in enumerate(choice):
                    if c < 0:
                        a = (1.0, 1.0, 1.0)
                        eth.append(0.0), ech.append(0.0)
                    else:
                        si, fi, ni = c // (F_ * N_), (c // N_) % F_, c % N_
                        a = (grid.alpha_s[si], grid.alpha_f[fi], grid.alpha_ns[ni])
                        d0, d1 = float(ls.den[h, 0]), float(ls.den[h, 1])
                        eth.append(float(num[h, 0, mi, si, fi, ni]) / d0 if d0 > 0 else 0.0)
                        ech.append(float(num[h, 1, mi, si, fi, ni]) / d1 if d1 > 0 else 0.0)
                    for key, val in zip(("alpha_s", "alpha_f", "alpha_ns"), a):
                        ratios[key].append(val)
                r = {k: (v[0] if len(set(v)) == 1 else tuple(v)) for k, v in ratios.items()}
                s = LayerSetting(**r, sharpness=metric, error_target=et, error_context=ec, relative_cost=rel,
                                 error_target_per_head=tuple(eth), error_context_per_head=tuple(ech))
                consider(rel, et / max(bt, 1e-12) + ec / max(bc, 1e-12), s)

    # ---- the adaptive mode, when the statistics measured it
    if ls.has_adaptive:
        for cand in _fit_adaptive(ls, grid, bt, bc, cost_model, dense_layer, per_head, min_gain):
            consider(*cand)

    if best is None or best[0] >= 1.0:
        return LayerSetting(dense=True, error_target=0.0, error_context=0.0, relative_cost=1.0)
    return best[2]


def _fit_heads(num: torch.Tensor, den: torch.Tensor, has: torch.Tensor, head_cost: torch.Tensor, dense_head: float,
               bt: float, bc: float):
    """Per-head choice minimising Σ cost subject to layer-level target and context errors within budget.

    num: [H, 2, S, F, NS]; returns (choice [H] flat option or -1 for dense, error_t, error_c) or None.
    """
    H = num.shape[0]
    n_opt = head_cost.numel()
    cost = torch.cat([head_cost.flatten(), torch.tensor([dense_head], dtype=torch.float64)]) / dense_head  # [O]
    gt = torch.zeros(H, n_opt + 1, dtype=torch.float64)
    gc = torch.zeros(H, n_opt + 1, dtype=torch.float64)
    if bool(has[0]):
        gt[:, :n_opt] = num[:, 0].reshape(H, -1) / float(den[0])
    if bool(has[1]):
        gc[:, :n_opt] = num[:, 1].reshape(H, -1) / float(den[1])
    found = _lagrange(gt, gc, cost.expand(H, n_opt + 1), bt, bc)
    if found is None:
        return None
    ch, et, ec = found
    choice = [(-1 if int(c) == n_opt else int(c)) for c in ch]
    return choice, et, ec


def _lagrange(gt: torch.Tensor, gc: torch.Tensor, cost: torch.Tensor, bt: float, bc: float):
    """Per-head option choice minimising Σ cost with Σ gt <= bt and Σ gc <= bc (Lagrangian relaxation).

    gt, gc, cost: [H, O] (each head's error share per kind and cost per option). Returns
    (choice [H] option indices, error_t, error_c) or None when no λ is feasible.
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


def _fit_adaptive(ls: LayerErrorStats, grid: Grid, bt: float, bc: float, cost_model: CostModel, dense_layer: float,
                  per_head: Union[bool, str], min_gain: float) -> List[Tuple[float, float, LayerSetting]]:
    """Candidate adaptive-mode settings of one layer as (relative cost, error score, setting).

    A setting is (α_s, mass, context_mass, pseudo_block): target-query errors and the rows of non-context query
    blocks follow ``mass``, context-query errors and rows ``context_mass`` (a query block's selection depends
    on its own threshold only). One setting for the layer: the cheapest whose layer errors meet the budget.
    Per head (``pseudo_block`` stays one per layer): a Lagrangian search over each head's (α_s, mass,
    context_mass) options plus exact attention (α_s = mass = 1, error 0), ranked by each head's measured pairs.
    Costs use :meth:`CostModel.adaptive_coefficients`.
    """
    H = ls.heads
    a, b, c = cost_model.adaptive_coefficients()
    scale = cost_model.dim_scale(ls.head_dim)
    pairs = ls.ad_pairs / max(ls.calls, 1)  # [H, S, P, PS, rows (non-context, context), (exact, pseudo)]
    row_cost = (a * pairs[..., 0] + b * pairs[..., 1]) * scale  # [H, S, P, PS, 2]
    head_cost = row_cost[:, :, :, None, :, 0] + row_cost[:, :, None, :, :, 1]  # [H, S, P (mass), P (context), PS]
    n = sum(ls.mean_tokens().values())
    exact_head = a * n * n * scale
    den = ls.ad_den.sum(0)  # [2]
    has = den > 0
    num = ls.ad_num  # [H, 2, S, P, PS]
    e = torch.where(has.view(2, 1, 1, 1), num.sum(0) / den.clamp(min=1e-300).view(2, 1, 1, 1), torch.zeros(()).double())
    err_t, err_c = e[0][:, :, None, :], e[1][:, None, :, :]  # broadcast to [S, P, P, PS]
    rel = (head_cost.sum(0) + c).clamp(min=cost_model.floor) / dense_layer  # [S, P, P, PS]
    ok = (err_t <= bt + 1e-12) & (err_c <= bc + 1e-12)
    score = err_t / max(bt, 1e-12) + err_c / max(bc, 1e-12)

    def masses(pt, pc):
        mt = tuple(grid.mass[i] if i >= 0 else 1.0 for i in pt)
        mc = tuple(grid.mass[i] if i >= 0 else 1.0 for i in pc)
        one = lambda v: v[0] if len(set(v)) == 1 else v  # noqa: E731
        return one(mt), (None if mc == mt else one(mc))

    out = []
    uniform_best = math.inf
    if bool(ok.any()):
        key = torch.where(ok, rel * 1e6 + score.clamp(max=1e5) * 1e-6, torch.full_like(rel, math.inf))
        si, pt, pc, qi = (int(x) for x in torch.unravel_index(torch.argmin(key), key.shape))
        uniform_best = float(rel[si, pt, pc, qi])
        m, cm = masses([pt], [pc])
        out.append((uniform_best, float(score[si, pt, pc, qi]), LayerSetting(
            mode="adaptive", alpha_s=grid.alpha_s[si], mass=m, context_mass=cm, pseudo_block=grid.pseudo_block[qi],
            error_target=float(e[0, si, pt, qi]), error_context=float(e[1, si, pc, qi]), relative_cost=uniform_best)))
    if not (per_head and H > 1):
        return out
    S, P, PS = grid.adaptive_shape
    n_opt = S * P * P
    for qi, ps in enumerate(grid.pseudo_block):
        gt = torch.zeros(H, n_opt + 1, dtype=torch.float64)
        gc = torch.zeros(H, n_opt + 1, dtype=torch.float64)
        if bool(has[0]):
            gt[:, :-1] = (num[:, 0, :, :, qi] / float(den[0]))[:, :, :, None].expand(H, S, P, P).reshape(H, -1)
        if bool(has[1]):
            gc[:, :-1] = (num[:, 1, :, :, qi] / float(den[1]))[:, :, None, :].expand(H, S, P, P).reshape(H, -1)
        cost = torch.cat([head_cost[..., qi].reshape(H, -1), torch.full((H, 1), exact_head, dtype=torch.float64)], 1)
        found = _lagrange(gt, gc, cost, bt, bc)
        if found is None:
            continue
        ch, et, ec = found
        r = max(cost_model.floor, float(cost.gather(1, ch[:, None]).sum()) + c) / dense_layer
        if not (per_head == "always" or r < uniform_best * (1 - min_gain)):
            continue
        a_s, pts, pcs, eth, ech = [], [], [], [], []
        for h, o in enumerate(ch.tolist()):
            if o == n_opt:
                a_s.append(1.0), pts.append(-1), pcs.append(-1), eth.append(0.0), ech.append(0.0)
                continue
            si, rest = divmod(o, P * P)
            pt, pc = divmod(rest, P)
            a_s.append(grid.alpha_s[si]), pts.append(pt), pcs.append(pc)
            d0, d1 = float(ls.ad_den[h, 0]), float(ls.ad_den[h, 1])
            eth.append(float(num[h, 0, si, pt, qi]) / d0 if d0 > 0 else 0.0)
            ech.append(float(num[h, 1, si, pc, qi]) / d1 if d1 > 0 else 0.0)
        m, cm = masses(pts, pcs)
        out.append((r, et / max(bt, 1e-12) + ec / max(bc, 1e-12), LayerSetting(
            mode="adaptive", alpha_s=a_s[0] if len(set(a_s)) == 1 else tuple(a_s), mass=m, context_mass=cm,
            pseudo_block=ps, error_target=et, error_context=ec, relative_cost=r,
            error_target_per_head=tuple(eth), error_context_per_head=tuple(ech))))
    return out


# ------------------------------------------------------------------------------------ held-out check
def _grid_index(values: Tuple[float, ...], v: float) -> Optional[int]:
    for i, g in enumerate(values):
        if abs(g - v) <= 1e-9:
            return i
    return None


def setting_errors(ls: LayerErrorStats, grid: Grid, setting: LayerSetting) -> Tuple[float, float]:
    """The (target, context) relative L1 error that ``setting`` has on the statistics ``ls``.

    Args:
        ls: one layer's statistics (e.g. of a sample the setting was not fitted on).
        grid: the grid ``ls`` was measured on; the setting's ratios must be grid values, except heads kept
            dense (all ratios 1), which contribute no error.
        setting: a fitted :class:`~isa_plugin.profile.LayerSetting` (uniform or per head).

    Returns:
        ``(error_target, error_context)``; 0 for a kind without queries and for a dense layer.

    Raises:
        ValueError: a ratio outside the grid.

    Example:
        >>> setting_errors(stats.get("blocks.0.attn1", sample=2), stats.grid, profile.layers["blocks.0.attn1"][0])
        (0.031, 0.042)
    """
    if setting.dense:
        return 0.0, 0.0
    H = ls.heads
    per_head = lambda v: v if isinstance(v, tuple) else (v,) * H  # noqa: E731
    if setting.mode == "adaptive":
        return _adaptive_setting_errors(ls, grid, setting, per_head)
    a_s, a_f, a_ns = per_head(setting.alpha_s), per_head(setting.alpha_f), per_head(setting.alpha_ns)
    mi = grid.metrics.index(setting.sharpness)
    num = torch.zeros(2, dtype=torch.float64)
    for h in range(H):
        if (a_s[h], a_f[h], a_ns[h]) == (1.0, 1.0, 1.0) and _grid_index(grid.alpha_ns, 1.0) is None:
            continue  # a head kept dense
        idx = (_grid_index(grid.alpha_s, a_s[h]), _grid_index(grid.alpha_f, a_f[h]), _grid_index(grid.alpha_ns, a_ns[h]))
        if None in idx:
            raise ValueError(f"head {h}: ratios {(a_s[h], a_f[h], a_ns[h])} are not on the calibration grid {grid.to_dict()}")
        num += ls.num[h, :, mi, idx[0], idx[1], idx[2]]
    den = ls.den.sum(0)
    err = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros(()).double())
    return float(err[0]), float(err[1])


def _adaptive_setting_errors(ls: LayerErrorStats, grid: Grid, setting: LayerSetting, per_head) -> Tuple[float, float]:
    """:func:`setting_errors` of an adaptive-mode setting (target errors follow ``mass``, context ``context_mass``)."""
    if not ls.has_adaptive:
        raise ValueError("an adaptive-mode setting needs statistics measured with Grid(mass=...)")
    H = ls.heads
    a_s, mt = per_head(setting.alpha_s), per_head(setting.mass)
    mc = mt if setting.context_mass is None else per_head(setting.context_mass)
    qi = grid.pseudo_block.index(setting.pseudo_block) if setting.pseudo_block in grid.pseudo_block else None
    num = torch.zeros(2, dtype=torch.float64)
    for h in range(H):
        if (a_s[h], mt[h], mc[h]) == (1.0, 1.0, 1.0) and _grid_index(grid.mass, 1.0) is None:
            continue  # a head computed exactly
        si, pt, pc = _grid_index(grid.alpha_s, a_s[h]), _grid_index(grid.mass, mt[h]), _grid_index(grid.mass, mc[h])
        if None in (si, pt, pc, qi):
            raise ValueError(f"head {h}: adaptive setting {(a_s[h], mt[h], mc[h], setting.pseudo_block)} is not on the "
                             f"calibration grid {grid.to_dict()}")
        num[0] += ls.ad_num[h, 0, si, pt, qi]
        num[1] += ls.ad_num[h, 1, si, pc, qi]
    den = ls.ad_den.sum(0)
    err = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros(()).double())
    return float(err[0]), float(err[1])


def _summed(parts: List[LayerErrorStats]) -> LayerErrorStats:
    out = LayerErrorStats.zeros(parts[0].heads, parts[0].head_dim, _GridShape(parts[0].num), device="cpu")
    if parts[0].ad_num is not None:
        for n in LayerErrorStats._ADAPTIVE:
            setattr(out, n, torch.zeros_like(getattr(parts[0], n), device="cpu"))
    for p in parts:
        out.add_(p)
    return out


class _GridShape:
    """Stand-in grid for :meth:`LayerErrorStats.zeros` from an existing ``num`` tensor's shape."""

    def __init__(self, num: torch.Tensor):
        self.shape = tuple(num.shape[2:])


def held_out_check(samples: Mapping[int, LayerErrorStats], fit_one, budget: Dict[str, Any], grid: Grid
                   ) -> Tuple[float, float]:
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


#: at most this many margin reductions per layer before the layer is kept dense
MAX_MARGIN_STEPS = 6


def _fit_layer_generalising(ls: LayerErrorStats, samples: Mapping[int, LayerErrorStats], grid: Grid, budget: Dict[str, Any],
                            cost_model: CostModel, per_head, margin: float, min_gain: float
                            ) -> Tuple[LayerSetting, Dict[str, Any]]:
    """Fit a layer so that it also meets the budget on samples it was not fitted on.

    The margin starts at ``margin``; while the leave-one-sample-out error (:func:`held_out_check`) of
    either query kind exceeds its budget, the margin shrinks by the ratio of budget to held-out error (and
    5% more), up to :data:`MAX_MARGIN_STEPS` times; then the layer stays dense. The final setting is
    fitted on all samples at the margin that passed.

    Returns:
        ``(setting, record)``; record: ``{"held_out_target", "held_out_context", "margin", "samples"}`` (the
        held-out errors None with fewer than two samples).
    """
    bt, bc = budget["target"], budget["context"]
    m = margin
    held = (None, None)
    for _ in range(MAX_MARGIN_STEPS + 1):
        fit_one = lambda st: _fit_layer(st, grid, budget, cost_model, per_head, m, min_gain)  # noqa: E731
        setting = fit_one(ls)
        if setting.dense or len(samples) < 2:
            held = (0.0, 0.0) if setting.dense and len(samples) >= 2 else (None, None)
            break
        held = held_out_check(samples, fit_one, budget, grid)
        if held[0] <= bt and held[1] <= bc:
            break
        m *= 0.95 * min(bt / max(held[0], 1e-12), bc / max(held[1], 1e-12), 1.0)
    else:
        setting, held = LayerSetting(dense=True, error_target=0.0, error_context=0.0, relative_cost=1.0), (0.0, 0.0)
    rnd = lambda x: None if x is None else round(float(x), 5)  # noqa: E731
    return setting, {"held_out_target": rnd(held[0]), "held_out_context": rnd(held[1]), "margin": round(m, 4),
                     "samples": len(samples)}


def fit_profile(stats: CalibrationStats, budget: BudgetArg = 0.05, cost_model: Optional[CostModel] = None, *,
                per_head: Union[bool, str] = "auto", margin: float = 0.85, min_gain: float = 0.02,
                metadata: Optional[Mapping[str, Any]] = None, held_out: bool = True) -> ThresholdProfile:
    """Pick, per layer (and timestep bucket), the cheapest ISA setting whose errors stay within budget.

    A pure function of its arguments. For each layer it considers every grid setting (sharpness metric,
    α_s, α_f, α_ns) for the whole layer, and — when ``per_head`` — per-head ratios (a Lagrangian search
    over each head's options, dense included, subject to the *layer's* target-query and context-query
    errors), keeping per-head ratios only when they cut the predicted cost by more than ``min_gain``.
    When the statistics measured the adaptive mode (``Grid(mass=...)``), its settings (α_s, mass, context
    mass, pseudo-key size; layer-wide and per head) compete too, each ranked by its own measured pair counts and
    :meth:`CostModel.adaptive_coefficients`; the cheapest setting of either mode wins the layer. Without
    adaptive measurements the result is the fixed mode's alone.
    A layer stays dense when no setting meets the budget or none is predicted to be faster.

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

    Returns:
        A :class:`ThresholdProfile`.

    Raises:
        ValueError: a bad budget, or statistics without any measured layer.

    Example:
        >>> profile = fit_profile(stats, budget=0.05, cost_model=load_cost_model())
        >>> profile.save("profile.yaml")
    """
    b = parse_budget(budget)
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
            if ls is None or not bool((ls.den > 0).any()):
                per_bucket.append(LayerSetting(dense=True))
                per_check.append(None)
                continue
            samples = {i: stats.get(name, bucket, sample=i) for i in stats.sample_ids(name, bucket)} if held_out else {}
            setting, check = _fit_layer_generalising(ls, samples, stats.grid, b, cm, per_head, margin, min_gain)
            per_bucket.append(setting)
            per_check.append(dict(check, predicted_target=setting.error_target, predicted_context=setting.error_context))
        layers[name] = per_bucket
        checks[name] = per_check
    diagnostics = {}
    for name in names:
        ls = stats.get(name, 0)
        if ls is None:
            continue
        rc = ls.rank_correlation()  # [H, 2, M, NS]
        diagnostics[name] = {
            # mean pooled attention mass target queries put on context blocks
            "context_mass": round(float(ls.ctx_mass.mean()) / max(ls.calls, 1), 4),
            # Spearman(sharpness, Taylor error) of target-query blocks, mean over heads and alpha_ns
            "sharpness_rank_corr": ({m: round(float(rc[:, 0, mi].mean()), 3) for mi, m in enumerate(stats.grid.metrics)}
                                    if bool((ls.corr_n[:, 0] > 0).all()) else None),
        }
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
    on.update(dict(metadata or {}))
    return ThresholdProfile(layers=layers, budget=b, block_size=stats.block_size, timestep_edges=stats.timestep_edges,
                            calibrated_on=on, cost_model=cm.to_dict())
