"""ISA's fixed ratios (``ISA.md``), the default selection mode.

Per (batch, head), from block means q̄, k̄ (every span blocked separately):

1. pooled attention P = softmax(q̄ k̄ᵀ · scale) over all key blocks;
2. keep the ⌈α_s·C⌉ context key blocks with the largest Σ_{target query blocks} P; KV' = target ∪ text ∪
   kept context blocks;
3. sharpness of each query block from its pooled row (top-k mass over target key blocks, or ‖P‖²);
4. the ⌈α_f·Q⌉ sharpest of the Q non-text query blocks (and every text query block) attend exactly over
   KV' (full rows);
5. every other query block computes exactly its top ⌈α_ns·K'⌉ non-text KV' blocks by q̄·k̄ (K' = number of
   non-text KV' blocks) plus all text blocks; each remaining KV' block enters as one block-mean pseudo-key.

The plan's diagnostics are ``sharpness`` (+inf for text query blocks) and ``saliency``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..kernels.counts import keep_count, topk_count
from ..layout import CONTEXT, TARGET, TEXT, BlockLayout
from ..plan import BlockPlan
from ..validation import Ratio, as_tuple, validate_ratio
from .base import CandidateTable, SelectionMode, context_selection, grid_index, register_mode, top_mask
from .fixed_measure import fixed_zero_stats, measure_fixed_call

__all__ = ["FixedSettings", "FixedGrid", "FixedMode", "SHARPNESS_METRICS", "RATIO_NAMES", "setting_pairs", "heads_pairs"]

#: the sharpness metrics ISA ranks query blocks by
SHARPNESS_METRICS = ("topk_mass", "l2")
#: the three ratios of ISA, in the order settings and profiles list them
RATIO_NAMES = ("alpha_s", "alpha_f", "alpha_ns")


@dataclass(frozen=True)
class FixedSettings:
    """Settings of the fixed mode.

    Args:
        alpha_s: fraction of context key blocks kept (by saliency); (0, 1], per head.
        alpha_f: fraction of non-text query blocks (the sharpest) sent to exact attention over KV'; per head.
        alpha_ns: fraction of non-text KV' blocks each Taylor query block computes exactly; per head.
        sharpness: ``"topk_mass"`` (mass of the top ``topk_fraction`` target key blocks of the pooled row) or
            ``"l2"`` (squared norm of the pooled row).
        topk_fraction: k = max(1, floor(topk_fraction · #target blocks)) for ``"topk_mass"``.

    Raises:
        TypeError / ValueError: naming the field, e.g. ``alpha_s=1.5 is out of range; use a value in (0, 1]``.
    """

    alpha_s: Ratio = 0.125
    alpha_f: Ratio = 0.5
    alpha_ns: Ratio = 0.0625
    sharpness: str = "topk_mass"
    topk_fraction: float = 0.0625

    def __post_init__(self):
        for name in RATIO_NAMES:
            object.__setattr__(self, name, validate_ratio(f"ISAConfig.{name}", getattr(self, name)))
        if self.sharpness not in SHARPNESS_METRICS:
            raise ValueError(f"ISAConfig.sharpness={self.sharpness!r} is not supported; supported: {list(SHARPNESS_METRICS)}")
        object.__setattr__(self, "topk_fraction", validate_ratio("ISAConfig.topk_fraction", self.topk_fraction))
        if isinstance(self.topk_fraction, tuple):
            raise TypeError("ISAConfig.topk_fraction must be a single number")


@dataclass(frozen=True)
class FixedGrid:
    """The fixed mode's calibration candidates: every (metric, α_s, α_f, α_ns), values sorted ascending."""

    alpha_s: Tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    alpha_f: Tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)
    alpha_ns: Tuple[float, ...] = (0.03125, 0.0625, 0.125, 0.25)
    metrics: Tuple[str, ...] = SHARPNESS_METRICS

    def __post_init__(self):
        for name in RATIO_NAMES:
            values = getattr(self, name)
            if isinstance(values, (numbers.Real, str)) or (isinstance(values, torch.Tensor) and values.ndim != 1):
                raise TypeError(f"Grid.{name}={values!r} must be a list of candidate values in (0, 1]")
            values = values if isinstance(values, torch.Tensor) else list(values)
            object.__setattr__(self, name, tuple(sorted(validate_ratio(f"Grid.{name}", values))))
        for m in self.metrics:
            if m not in SHARPNESS_METRICS:
                raise ValueError(f"Grid metric {m!r} is not supported; supported: {list(SHARPNESS_METRICS)}")
        object.__setattr__(self, "metrics", tuple(self.metrics))

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(metrics, alpha_s, alpha_f, alpha_ns)."""
        return (len(self.metrics), len(self.alpha_s), len(self.alpha_f), len(self.alpha_ns))

    def candidates(self):
        for m in self.metrics:
            for a_s in self.alpha_s:
                for a_f in self.alpha_f:
                    for a_ns in self.alpha_ns:
                        yield {"alpha_s": a_s, "alpha_f": a_f, "alpha_ns": a_ns, "sharpness": m}


def _count(alpha: float, n: float) -> float:
    """:func:`keep_count` of a mean block count (rounded to whole blocks)."""
    return float(keep_count(alpha, round(n)))


def setting_pairs(alpha_s: float, alpha_f: float, alpha_ns: float, tokens, blocks):
    """(exact pairs, approximated pairs) of one head for one fixed-mode setting, from token and block counts.

    Mirrors the plan's counting (``ceil`` per head): ⌈α_s·C⌉ context blocks kept, ⌈α_f·Q⌉ exact query blocks,
    ⌈α_ns·K'⌉ exact key blocks per Taylor query block; text queries exact, text keys always exact.
    """
    tt, tc, tx = tokens.get("target", 0.0), tokens.get("context", 0.0), tokens.get("text", 0.0)
    bt, bc = blocks.get("target", 0.0), blocks.get("context", 0.0)
    per_c = tc / bc if bc else 0.0
    kept = _count(alpha_s, bc)
    kv_tokens = tt + tx + kept * per_c
    kprime = bt + kept  # non-text KV' blocks
    q_blocks = bt + bc
    q_tokens = tt + tc
    ex_q = _count(alpha_f, q_blocks) / q_blocks * q_tokens if q_blocks else 0.0
    tay_q = q_tokens - ex_q
    n_ex = _count(alpha_ns, kprime)
    per_kv = (tt + kept * per_c) / kprime if kprime else 0.0
    exact = (ex_q + tx) * kv_tokens + tay_q * (n_ex * per_kv + tx)
    approx = tay_q * (kprime - n_ex)
    return exact, approx


def heads_pairs(ratios: Mapping[str, Any], tokens, blocks, heads: int) -> Tuple[float, float]:
    """(exact pairs, approximated pairs) of one batch entry summed over ``heads`` heads (:func:`setting_pairs`
    per head); ``ratios`` holds ``alpha_s``, ``alpha_f``, ``alpha_ns``, each a number or one value per head.

    Raises:
        ValueError: per-head ratios whose length is not ``heads``.
    """
    per_head = []
    for name in RATIO_NAMES:
        r = ratios[name]
        if isinstance(r, (tuple, list)) and len(r) != heads:
            raise ValueError(f"{name} has {len(r)} per-head values for {heads} heads; give one per head or one number")
        per_head.append(tuple(r) if isinstance(r, (tuple, list)) else (r,) * heads)
    exact = approx = 0.0
    for a_s, a_f, a_ns in zip(*per_head):
        e, a = setting_pairs(a_s, a_f, a_ns, tokens, blocks)
        exact, approx = exact + e, approx + a
    return exact, approx


class FixedMode(SelectionMode):
    """ISA's fixed ratios (see the module docstring)."""

    name = "fixed"
    settings_type = FixedSettings
    spec = "ISA.md"
    per_head_fields = RATIO_NAMES
    profile_fields = ("alpha_s", "alpha_f", "alpha_ns", "sharpness")
    grid_type = FixedGrid
    executors = ("triton", "sparse")

    @property
    def gpu_planners(self):
        from .fixed_gpu import plan_compact

        return {"triton": plan_compact}

    def is_dense(self, settings: FixedSettings) -> bool:
        return all(v == 1.0 for name in RATIO_NAMES for v in as_tuple(getattr(settings, name)))

    def exact_settings(self) -> Dict[str, Any]:
        return {"alpha_s": 1.0, "alpha_f": 1.0, "alpha_ns": 1.0}

    def cost_coefficients(self, cost_model) -> Tuple[float, float, float]:
        return cost_model.a, cost_model.b, cost_model.c

    def call_pairs(self, settings: FixedSettings, layout, block_size: int, heads: int) -> Tuple[float, float]:
        blocks = layout.blocks(block_size)
        tokens = {kind: layout.num(kind) for kind in ("target", "context", "text")}
        counts = {"target": blocks.count(TARGET), "context": blocks.count(CONTEXT), "text": blocks.count(TEXT)}
        return heads_pairs({n: getattr(settings, n) for n in RATIO_NAMES}, tokens, counts, heads)

    # ------------------------------------------------------------------ planning
    def plan(self, qbar, kbar, blocks: BlockLayout, settings: FixedSettings, scale: float) -> BlockPlan:
        B, H, nb, _ = qbar.shape
        dev = qbar.device
        blocks = blocks.to(dev)
        ratios = self.per_head(settings, H, device=dev)
        kinds = blocks.kinds
        is_t, is_x = kinds == TARGET, kinds == TEXT

        logits = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale  # [B, H, nb, nb]
        P = torch.softmax(logits, dim=-1)
        kv_keep, saliency = context_selection(P, blocks, ratios["alpha_s"])  # [B, H, nb]

        if settings.sharpness == "topk_mass":
            n_t = blocks.count(TARGET)
            # top-k over the target key blocks (P >= 0, so -1 never ranks; no boolean indexing: no synchronisation)
            sharp = P.masked_fill(~is_t, -1.0).topk(topk_count(settings.topk_fraction, n_t), dim=-1).values.sum(-1)
        else:
            sharp = (P * P).sum(-1)
        sharp = sharp.masked_fill(is_x, float("inf"))

        # grouping; text query blocks always exact
        n_q = nb - blocks.count(TEXT)
        exact_q = top_mask(sharp, (~is_x).expand(B, H, nb), keep_count(ratios["alpha_f"], n_q)[None, :].expand(B, H)) | is_x

        # Taylor selections over non-text KV' blocks, plus all text blocks
        cand = (kv_keep & ~is_x)[:, :, None, :].expand(B, H, nb, nb)
        k_prime = (kv_keep & ~is_x).sum(-1)  # [B, H]
        n_exact = keep_count(ratios["alpha_ns"][None, :], k_prime)[:, :, None].expand(B, H, nb)
        taylor_sel = top_mask(logits, cand, n_exact) | is_x
        exact_kv = torch.where(exact_q[..., None], kv_keep[:, :, None, :], taylor_sel)
        return BlockPlan.from_masks(blocks, kv_keep, exact_kv, blocks.block_size,
                                    {"sharpness": sharp.float(), "saliency": saliency.float()})

    # ------------------------------------------------------------------ calibration
    def measure(self, q, k, v, layout, grid: FixedGrid, *, block_size: int, sampler, scale=None):
        return measure_fixed_call(q, k, v, layout, grid, block_size=block_size, sampler=sampler, scale=scale)

    def zero_stats(self, heads: int, grid: FixedGrid, device=None) -> Dict[str, torch.Tensor]:
        return fixed_zero_stats(heads, grid, device)

    def candidates(self, stats, grid: FixedGrid, layer, cost_model) -> CandidateTable:
        tokens, blocks = layer.mean_tokens(), layer.mean_blocks()
        M, S, F, NS = grid.shape
        head_cost = torch.empty(S, F, NS, dtype=torch.float64)
        for si, a_s in enumerate(grid.alpha_s):
            for fi, a_f in enumerate(grid.alpha_f):
                for ni, a_ns in enumerate(grid.alpha_ns):
                    e, a = setting_pairs(a_s, a_f, a_ns, tokens, blocks)
                    head_cost[si, fi, ni] = (cost_model.a * e + cost_model.b * a) * cost_model.dim_scale(layer.head_dim)
        e, a = setting_pairs(1.0, 1.0, 1.0, tokens, blocks)
        dense_head = (cost_model.a * e + cost_model.b * a) * cost_model.dim_scale(layer.head_dim)
        per = S * F * NS
        groups = [torch.arange(m * per, (m + 1) * per) for m in range(M)]
        H = stats["num"].shape[0]
        return CandidateTable(num=stats["num"].reshape(H, 2, -1), den=stats["den"], cost=head_cost.flatten().repeat(M),
                              dense_head=dense_head, call_cost=cost_model.c, uniform_groups=groups, head_groups=groups)

    def settings_for(self, grid: FixedGrid, choice: Sequence[int]) -> Dict[str, Any]:
        M, S, F, NS = grid.shape
        metrics = {c // (S * F * NS) for c in choice if c >= 0}
        ratios = {"alpha_s": [], "alpha_f": [], "alpha_ns": []}
        for c in choice:
            if c < 0:
                a = (1.0, 1.0, 1.0)
            else:
                r = c % (S * F * NS)
                a = (grid.alpha_s[r // (F * NS)], grid.alpha_f[(r // NS) % F], grid.alpha_ns[r % NS])
            for key, val in zip(RATIO_NAMES, a):
                ratios[key].append(val)
        out = {k: (v[0] if len(set(v)) == 1 else tuple(v)) for k, v in ratios.items()}
        out["sharpness"] = grid.metrics[metrics.pop()] if metrics else grid.metrics[0]
        return out

    def candidate_index(self, grid: FixedGrid, settings: FixedSettings, heads: int) -> List[int]:
        M, S, F, NS = grid.shape
        a_s, a_f, a_ns = (as_tuple(getattr(settings, n)) * (1 if isinstance(getattr(settings, n), tuple) else heads)
                          for n in RATIO_NAMES)
        mi = grid.metrics.index(settings.sharpness)
        out = []
        for h in range(heads):
            if (a_s[h], a_f[h], a_ns[h]) == (1.0, 1.0, 1.0) and grid_index(grid.alpha_ns, 1.0) is None:
                out.append(-1)  # a head kept dense
                continue
            idx = (grid_index(grid.alpha_s, a_s[h]), grid_index(grid.alpha_f, a_f[h]), grid_index(grid.alpha_ns, a_ns[h]))
            if None in idx:
                raise ValueError(f"head {h}: ratios {(a_s[h], a_f[h], a_ns[h])} are not on the calibration grid "
                                 f"{self.grid_to_dict(grid)}")
            out.append(((mi * S + idx[0]) * F + idx[1]) * NS + idx[2])
        return out

    def diagnostics(self, stats, grid: FixedGrid, calls: int) -> Dict[str, Any]:
        rc = stats["corr_sum"] / stats["corr_n"].clamp(min=1)[..., None, None]  # [H, 2, M, NS]
        return {
            # mean pooled attention mass target queries put on context blocks
            "context_mass": round(float(stats["ctx_mass"].mean()) / max(calls, 1), 4),
            # Spearman(sharpness, Taylor error) of target-query blocks, mean over heads and alpha_ns
            "sharpness_rank_corr": ({m: round(float(rc[:, 0, mi].mean()), 3) for mi, m in enumerate(grid.metrics)}
                                    if bool((stats["corr_n"][:, 0] > 0).all()) else None),
        }



register_mode(FixedMode())
