"""The adaptive selection mode (``docs/ADAPTIVE.md``): per query block, the fewest key blocks holding a
share ``mass`` of its pooled attention are exact; the other KV' blocks enter as sub-block pseudo-keys.

Per (batch, head):

1. blocks and block means as in the fixed mode; the fixed mode's context pre-selection (α_s) gives KV';
2. pooled mass m_ij ∝ n_j·exp(q̄_i·k̄_j·scale) over KV' (count bias ln n_j);
3. each non-text query block computes exactly every text block plus the fewest non-text KV' blocks (by
   descending m_ij, stable) whose mass, with the text blocks', reaches p (``context_mass`` for context query
   blocks, ``mass`` for the others), clamped to [min_blocks, max_blocks]; text query blocks attend exactly
   over KV';
4. every other KV' block enters as pseudo-keys: the means of its sub-blocks of ``pseudo_block`` tokens, or with
   ``pseudo_keys="kmeans"`` as many k-means centroids of its keys (:mod:`isa_plugin.kernels.pseudo`).

The plan's diagnostics are ``covered`` (pooled mass held by the exact blocks), ``n_exact`` and ``saliency``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.pseudo import validate_pseudo_keys
from ..layout import CONTEXT, TEXT, BlockLayout
from ..plan import BlockPlan
from ..validation import Count, Ratio, as_tuple, validate_count, validate_ratio
from .base import CandidateTable, SelectionMode, context_selection, grid_index, register_mode
from .measure import sampled_call
from .ordered_measure import OrderedFamily, measure_ordered

__all__ = ["AdaptiveSettings", "AdaptiveGrid", "AdaptiveMode", "ADAPTIVE_MASS"]

#: the adaptive mode's calibration grid of pooled-mass thresholds: from p = 1 - UNSPENT_MAX on, each step leaves
#: UNSPENT_STEP of the previous step's unspent mass 1 - p (51 values, 0.05 … 0.995; at 0.05 a query block keeps
#: about its ``min_blocks`` exact blocks, the rest is pseudo-keys). The measurement costs the same for any number of
#: thresholds (:mod:`.ordered_measure`), so the grid is as fine as the fit can use.
UNSPENT_MAX, UNSPENT_STEP, MASS_STEPS = 0.95, 0.9, 51
ADAPTIVE_MASS = tuple(round(1.0 - UNSPENT_MAX * UNSPENT_STEP**i, 4) for i in range(MASS_STEPS))


@dataclass(frozen=True)
class AdaptiveSettings:
    """Settings of the adaptive mode; every per-head field may be one value per head.

    Args:
        mass: p in (0, 1], the pooled attention mass a query block's exact key blocks must hold. Per head.
        context_mass: the same for context query blocks (None: ``mass``). Per head.
        min_blocks: at least this many exact non-text key blocks per query block (>= 1). Per head.
        max_blocks: at most this many (0 = no bound; else >= ``min_blocks``). Per head.
        pseudo_block: tokens per pseudo-key; divides the block size. None: the block size (one pseudo-key
            per block, as in the fixed mode).
        pseudo_keys: ``"mean"`` (the means of contiguous sub-blocks of ``pseudo_block`` tokens) or ``"kmeans"``
            (as many centroids, by k-means on the block's keys; :mod:`isa_plugin.kernels.pseudo`). With one
            pseudo-key per block both are the block mean.
        alpha_s: fraction of context blocks kept (the fixed mode's context pre-selection, with its default). Per head.

    Raises:
        TypeError / ValueError: a value of the wrong type or range, naming the field.
    """

    mass: Ratio = 0.9
    context_mass: Optional[Ratio] = None
    min_blocks: Count = 1
    max_blocks: Count = 0
    pseudo_block: Optional[int] = None
    alpha_s: Ratio = 0.125
    pseudo_keys: str = "mean"

    def __post_init__(self):
        object.__setattr__(self, "mass", validate_ratio("ISAConfig.mass", self.mass))
        if self.context_mass is not None:
            object.__setattr__(self, "context_mass", validate_ratio("ISAConfig.context_mass", self.context_mass))
        object.__setattr__(self, "alpha_s", validate_ratio("ISAConfig.alpha_s", self.alpha_s))
        object.__setattr__(self, "min_blocks", validate_count("ISAConfig.min_blocks", self.min_blocks, 1))
        object.__setattr__(self, "max_blocks", validate_count("ISAConfig.max_blocks", self.max_blocks, 0))
        validate_pseudo_keys("ISAConfig.pseudo_keys", self.pseudo_keys)
        s = self.pseudo_block
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral)):
            raise TypeError(f"ISAConfig.pseudo_block={s!r} must be an integer dividing the block size")
        lo, hi = as_tuple(self.min_blocks), as_tuple(self.max_blocks)
        n = max(len(lo), len(hi))
        if len(lo) in (1, n) and len(hi) in (1, n):
            lo, hi = lo * (n // len(lo)), hi * (n // len(hi))
            bad = [h for h in range(n) if hi[h] and hi[h] < lo[h]]
            if bad:
                raise ValueError(f"ISAConfig.max_blocks < min_blocks (heads {bad}); use max_blocks >= min_blocks or 0 (no bound)")


@dataclass(frozen=True)
class AdaptiveGrid:
    """The adaptive mode's calibration candidates: every (α_s, mass, context_mass, pseudo-key variant).

    The pseudo-key variants are every (``pseudo_block``, ``pseudo_keys``) pair, ``pseudo_block``-major
    (:attr:`pseudo_variants`); by default 16-token k-means slots and one block mean per block.
    """

    alpha_s: Tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    mass: Tuple[float, ...] = ADAPTIVE_MASS
    pseudo_block: Tuple[int, ...] = (16, 64)
    pseudo_keys: Tuple[str, ...] = ("kmeans",)

    def __post_init__(self):
        for name in ("alpha_s", "mass"):
            values = getattr(self, name)
            if isinstance(values, (numbers.Real, str)) or (isinstance(values, torch.Tensor) and values.ndim != 1):
                raise TypeError(f"Grid.{name}={values!r} must be a list of candidate values in (0, 1]")
            values = values if isinstance(values, torch.Tensor) else list(values)
            if not len(values):
                raise ValueError(f"Grid.{name} is empty; give at least one candidate value")
            object.__setattr__(self, name, tuple(sorted(validate_ratio(f"Grid.{name}", values))))
        ps = tuple(self.pseudo_block)
        if not ps or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for x in ps):
            raise ValueError(f"Grid.pseudo_block={ps!r} must be a non-empty list of positive integers (tokens per pseudo-key)")
        object.__setattr__(self, "pseudo_block", tuple(sorted(int(x) for x in ps)))
        kinds = (self.pseudo_keys,) if isinstance(self.pseudo_keys, str) else tuple(self.pseudo_keys)
        if not kinds:
            raise ValueError("Grid.pseudo_keys is empty; give 'mean', 'kmeans' or both")
        object.__setattr__(self, "pseudo_keys", tuple(dict.fromkeys(validate_pseudo_keys("Grid.pseudo_keys", k) for k in kinds)))

    @property
    def pseudo_variants(self) -> Tuple[Tuple[int, str], ...]:
        """The measured (pseudo_block, pseudo_keys) pairs, ``pseudo_block``-major."""
        return tuple((s, kind) for s in self.pseudo_block for kind in self.pseudo_keys)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(alpha_s, mass, pseudo-key variants)."""
        return (len(self.alpha_s), len(self.mass), len(self.pseudo_variants))


class AdaptiveMode(SelectionMode):
    """Per-query-block selection by pooled mass (see the module docstring)."""

    name = "adaptive"
    settings_type = AdaptiveSettings
    spec = "docs/ADAPTIVE.md"
    per_head_fields = ("alpha_s", "mass", "context_mass", "min_blocks", "max_blocks")
    profile_fields = ("alpha_s", "mass")
    optional_profile_fields = ("context_mass", "pseudo_block", "pseudo_keys")
    # profiles of earlier versions list the fixed mode's fields beside the adaptive ones (unused)
    legacy_profile_fields = ("alpha_f", "alpha_ns", "sharpness")
    grid_type = AdaptiveGrid
    gpu_planners: Dict[str, Any] = {}

    def resolve(self, settings: AdaptiveSettings, block_size: int) -> AdaptiveSettings:
        s = block_size if settings.pseudo_block is None else int(settings.pseudo_block)
        if not (1 <= s <= block_size) or block_size % s:
            raise ValueError(f"ISAConfig.pseudo_block={settings.pseudo_block!r} must divide block_size={block_size} "
                             f"(e.g. 16 or {block_size})")
        return settings if s == settings.pseudo_block else dataclasses.replace(settings, pseudo_block=s)

    def per_head(self, settings: AdaptiveSettings, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        out = super().per_head(settings, num_heads, device)
        out.setdefault("context_mass", out["mass"])
        return out

    def is_dense(self, settings: AdaptiveSettings) -> bool:
        return all(v == 1.0 for v in as_tuple(settings.alpha_s)) and (
            all(v == 1.0 for v in as_tuple(settings.mass) + as_tuple(settings.context_mass or 1.0)) or settings.pseudo_block == 1)

    def pseudo_block(self, settings: AdaptiveSettings, block_size: int) -> int:
        return block_size if settings.pseudo_block is None else settings.pseudo_block

    def pseudo_keys(self, settings: AdaptiveSettings) -> str:
        return settings.pseudo_keys

    def exact_settings(self) -> Dict[str, Any]:
        return {"alpha_s": 1.0, "mass": 1.0}

    def cost_coefficients(self, cost_model) -> Tuple[float, float, float]:
        return cost_model.adaptive_coefficients()

    # ------------------------------------------------------------------ planning
    def order(self, qbar, kbar, blocks: BlockLayout, alpha_s: torch.Tensor, scale: float) -> "_Order":
        """Steps 2–3 of the spec and the candidates' order (step 4) for block means q̄, k̄ [B, H, nb, D]."""
        B, H, nb, _ = qbar.shape
        is_x = blocks.kinds == TEXT
        raw = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale  # [B, H, nb, nb]
        # the fixed mode's context pre-selection (its pooled softmax has no count bias)
        kv_keep, saliency = context_selection(torch.softmax(raw, dim=-1), blocks, alpha_s)  # [B, H, nb]
        # pooled mass with the count bias, over KV'
        log_n = torch.log(blocks.counts.to(qbar.dtype))
        m = torch.softmax((raw + log_n).masked_fill(~kv_keep[:, :, None, :], float("-inf")), dim=-1)  # [B, H, nb, nb]
        text_mass = (m * is_x).sum(-1)  # [B, H, nb]
        cand = (kv_keep & ~is_x)[:, :, None, :].expand(B, H, nb, nb)
        order = torch.sort(m.masked_fill(~cand, -1.0), dim=-1, descending=True, stable=True).indices
        m_sorted = torch.gather(m, -1, order).masked_fill(~torch.gather(cand, -1, order), 0.0)
        prefix = torch.cumsum(m_sorted, -1)
        prefix = torch.cat([torch.zeros_like(prefix[..., :1]), prefix[..., :-1]], -1)  # S_k, k = 0 .. nb-1
        # T_i + S_k, made non-decreasing (a parallel cumsum may round a later sum below an earlier one)
        reached = torch.cummax(torch.nan_to_num(text_mass[..., None] + prefix, nan=float("inf")), -1).values
        return _Order(kv_keep, saliency, m, order, reached, cand[:, :, 0, :].sum(-1), is_x)

    def exact_count(self, o: "_Order", p: torch.Tensor, min_blocks: torch.Tensor, max_blocks: torch.Tensor) -> torch.Tensor:
        """Step 4: exact candidates per query block, [B, H, nb, G], for thresholds ``p`` [H, nb, G] (float64).

        The one rule every planner and the calibration of this mode apply: k* = the number of leading sums
        T_i + S_k below p (at most K'; K' when p = 1), clamped to [min_blocks, max_blocks], K' for text
        query blocks.
        """
        B, H, nb, _ = o.reached.shape
        kp = o.k_prime[:, :, None, None]
        below = torch.searchsorted(o.reached.contiguous(), p.to(o.reached.dtype).expand(B, H, nb, p.shape[-1]).contiguous())
        k_star = torch.where((p >= 1.0)[None], kp, torch.minimum(below, kp))
        lo = torch.minimum(min_blocks[None, :, None, None], kp)
        hi = torch.where(max_blocks[None, :, None, None] > 0, torch.minimum(max_blocks[None, :, None, None], kp), kp)
        n_exact = torch.minimum(torch.maximum(k_star, lo), hi)
        return torch.where(o.is_x[None, None, :, None], kp, n_exact)  # text query blocks: all of KV'

    def plan(self, qbar, kbar, blocks: BlockLayout, settings: AdaptiveSettings, scale: float) -> BlockPlan:
        """The plan of block means q̄, k̄ [B, H, nb, D]: torch ops on the CPU (and for float64 block means, the
        reference's), :meth:`plan_fused` on a GPU."""
        if qbar.is_cuda and qbar.dtype != torch.float64:
            return self.plan_fused(qbar, kbar, blocks, settings, scale)
        B, H, nb, _ = qbar.shape
        dev = qbar.device
        blocks = blocks.to(dev)
        ph = self.per_head(settings, H, device=dev)
        o = self.order(qbar, kbar, blocks, ph["alpha_s"], scale)
        p_q = self._thresholds(blocks, ph)
        n_exact = self.exact_count(o, p_q[..., None], ph["min_blocks"], ph["max_blocks"])[..., 0]  # [B, H, nb]
        rank = torch.empty_like(o.order)
        rank.scatter_(-1, o.order, torch.arange(nb, device=dev).expand_as(o.order))
        cand = (o.kv_keep & ~o.is_x)[:, :, None, :]
        exact_kv = ((rank < n_exact[..., None]) & cand) | (o.is_x & o.kv_keep)[:, :, None, :]
        covered = (o.m * exact_kv).sum(-1)
        return BlockPlan.from_masks(blocks, o.kv_keep, exact_kv, self.pseudo_block(settings, blocks.block_size),
                                    {"covered": covered, "n_exact": n_exact, "saliency": o.saliency.float()},
                                    pseudo_keys=settings.pseudo_keys)

    @staticmethod
    def _thresholds(blocks: BlockLayout, ph: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[H, nb] float64: the threshold of each query block, context_mass for context query blocks, mass for the others."""
        return torch.where((blocks.kinds == CONTEXT)[None, :], ph["context_mass"][:, None], ph["mass"][:, None])

    def plan_fused(self, qbar, kbar, blocks: BlockLayout, settings: AdaptiveSettings, scale: float) -> BlockPlan:
        """:meth:`plan` with steps 2-4 and the lists in two Triton kernels (:mod:`isa_plugin.kernels.mass_select`):
        the pooled logits and the context pre-selection in torch, then one program per query block. No host
        synchronisation. Rows whose prefix sum lands within float rounding of the threshold may keep one block
        more or less than the torch planner (the two round the parallel sums differently)."""
        from ..kernels.mass_select import mass_select_triton

        B, H, nb, _ = qbar.shape
        dev = qbar.device
        blocks = blocks.to(dev)
        ph = self.per_head(settings, H, device=dev)
        raw = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale  # [B, H, nb, nb]
        kv_keep, saliency = context_selection(torch.softmax(raw, dim=-1), blocks, ph["alpha_s"])
        log_n = torch.log(blocks.counts.to(qbar.dtype))
        exact, row_ptr, col_idx, n_exact, covered = mass_select_triton(
            raw, log_n, kv_keep, blocks.kinds == TEXT, self._thresholds(blocks, ph), ph["min_blocks"], ph["max_blocks"])
        return BlockPlan(blocks, kv_keep, row_ptr, col_idx, self.pseudo_block(settings, blocks.block_size),
                         {"covered": covered, "n_exact": n_exact, "saliency": saliency.float()}, _mask=exact,
                         pseudo_keys=settings.pseudo_keys)

    # ------------------------------------------------------------------ calibration
    def default_grid(self, block_size: int) -> AdaptiveGrid:
        return AdaptiveGrid(pseudo_block=tuple({s for s in (16, block_size) if block_size % s == 0}))

    def check_grid(self, grid: AdaptiveGrid, block_size: int) -> None:
        """Raise a ValueError for ``pseudo_block`` values that do not divide the block size."""
        bad = [s for s in grid.pseudo_block if s > block_size or block_size % s]
        if bad:
            raise ValueError(f"Grid.pseudo_block values {bad} do not divide block_size={block_size}")

    def measure(self, q, k, v, layout, grid: AdaptiveGrid, *, block_size: int, sampler, scale=None):
        """Errors per (α_s, mass, pseudo-key variant) and the pair counts of target and context rows, from one pass
        (:mod:`.ordered_measure`: for one α_s the plans of every mass differ only in how many of each query
        block's ordered candidates are exact). A query block's selection depends on its own threshold only, so
        any (mass, context_mass) pair is a sum of two measured entries."""
        self.check_grid(grid, block_size)
        call = sampled_call(q, k, v, layout, block_size, sampler, scale)
        if call is None:
            return self.zero_stats(q.shape[-2], grid, q.device)
        H, nb = q.shape[-2], call.blocks.num_blocks
        base = self.per_head(self.settings(block_size), H, device=q.device)
        p = torch.tensor(grid.mass, dtype=torch.float64, device=q.device).expand(H, nb, len(grid.mass))
        families = []
        for a_s in grid.alpha_s:
            o = self.order(call.qbar, call.kbar, call.blocks, torch.full((H,), a_s, dtype=torch.float64, device=q.device), call.scale)
            n = self.exact_count(o, p, base["min_blocks"], base["max_blocks"])
            families.append(OrderedFamily(o.kv_keep[0], (o.is_x & o.kv_keep)[0], o.order[0], n[0]))
        r = measure_ordered(call, families, grid.pseudo_variants)
        return {"ad_num": r["num"], "ad_den": r["den"], "ad_pairs": r["pairs"]}

    def zero_stats(self, heads: int, grid: AdaptiveGrid, device=None) -> Dict[str, torch.Tensor]:
        S, P, PS = grid.shape
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return {"ad_num": z(heads, 2, S, P, PS), "ad_den": z(heads, 2), "ad_pairs": z(heads, S, P, PS, 2, 2)}

    def candidates(self, stats, grid: AdaptiveGrid, layer, cost_model) -> CandidateTable:
        """Candidates (α_s, mass, context_mass, pseudo-key variant), flattened in that order: target errors and the
        rows of non-context query blocks follow ``mass``, context errors and rows ``context_mass``."""
        a, b, c = self.cost_coefficients(cost_model)
        scale = cost_model.dim_scale(layer.head_dim)
        S, P, PS = grid.shape
        H = stats["ad_num"].shape[0]
        pairs = stats["ad_pairs"] / max(layer.calls, 1)  # [H, S, P, PS, rows, (exact, pseudo)]
        row_cost = (a * pairs[..., 0] + b * pairs[..., 1]) * scale  # [H, S, P, PS, 2]
        cost = row_cost[:, :, :, None, :, 0] + row_cost[:, :, None, :, :, 1]  # [H, S, P (mass), P (context), PS]
        num = stats["ad_num"]  # [H, 2, S, P, PS]
        num_t = num[:, 0][:, :, :, None, :].expand(H, S, P, P, PS)
        num_c = num[:, 1][:, :, None, :, :].expand(H, S, P, P, PS)
        n = sum(layer.mean_tokens().values())
        flat = torch.arange(S * P * P * PS).view(S, P, P, PS)
        return CandidateTable(num=torch.stack([num_t, num_c], 1).reshape(H, 2, -1), den=stats["ad_den"],
                              cost=cost.reshape(H, -1), dense_head=a * n * n * scale, call_cost=c,
                              uniform_groups=[flat.flatten()], head_groups=[flat[..., qi].flatten() for qi in range(PS)])

    def _unflat(self, grid: AdaptiveGrid, c: int) -> Tuple[int, int, int, int]:
        S, P, PS = grid.shape
        si, rest = divmod(c, P * P * PS)
        pt, rest = divmod(rest, P * PS)
        pc, qi = divmod(rest, PS)
        return si, pt, pc, qi

    def settings_for(self, grid: AdaptiveGrid, choice: Sequence[int]) -> Dict[str, Any]:
        a_s, mt, mc, qis = [], [], [], set()
        for c in choice:
            if c < 0:
                a_s.append(1.0), mt.append(1.0), mc.append(1.0)
                continue
            si, pt, pc, qi = self._unflat(grid, c)
            a_s.append(grid.alpha_s[si]), mt.append(grid.mass[pt]), mc.append(grid.mass[pc])
            qis.add(qi)
        one = lambda v: v[0] if len(set(v)) == 1 else tuple(v)  # noqa: E731
        ps, kind = grid.pseudo_variants[qis.pop() if qis else 0]
        return {"alpha_s": one(a_s), "mass": one(mt), "context_mass": None if mc == mt else one(mc),
                "pseudo_block": ps, "pseudo_keys": kind}

    def candidate_index(self, grid: AdaptiveGrid, settings: AdaptiveSettings, heads: int) -> List[int]:
        S, P, PS = grid.shape
        per = lambda v: v if isinstance(v, tuple) else (v,) * heads  # noqa: E731
        a_s, mt = per(settings.alpha_s), per(settings.mass)
        mc = mt if settings.context_mass is None else per(settings.context_mass)
        variant = (settings.pseudo_block, settings.pseudo_keys)
        qi = grid.pseudo_variants.index(variant) if variant in grid.pseudo_variants else None
        out = []
        for h in range(heads):
            if (a_s[h], mt[h], mc[h]) == (1.0, 1.0, 1.0) and grid_index(grid.mass, 1.0) is None:
                out.append(-1)  # a head computed exactly
                continue
            si, pt, pc = grid_index(grid.alpha_s, a_s[h]), grid_index(grid.mass, mt[h]), grid_index(grid.mass, mc[h])
            if None in (si, pt, pc, qi):
                raise ValueError(f"head {h}: adaptive setting {(a_s[h], mt[h], mc[h], *variant)} is not on the "
                                 f"calibration grid {self.grid_to_dict(grid)}")
            out.append(((si * P + pt) * P + pc) * PS + qi)
        return out



@dataclass
class _Order:
    """The adaptive planner's pooled quantities ([B, H, nb] / [B, H, nb, nb]): KV', saliency, mass m_ij, the
    candidates' order, the running sums T_i + S_k reached after k candidates, K' and the text-block mask [nb]."""

    kv_keep: torch.Tensor
    saliency: torch.Tensor
    m: torch.Tensor
    order: torch.Tensor
    reached: torch.Tensor
    k_prime: torch.Tensor
    is_x: torch.Tensor


register_mode(AdaptiveMode())
