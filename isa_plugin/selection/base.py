"""Selection modes: what a mode is, and the registry that finds one by name.

A selection mode turns pooled statistics of one attention call (block means q̄, k̄) into a
:class:`~isa_plugin.plan.BlockPlan`. It owns everything that depends on how it selects:

- its settings (a frozen dataclass, :attr:`SelectionMode.settings_type`) and their validation;
- its planner (:meth:`SelectionMode.plan`, plain torch ops on any device) and, where it has them, GPU
  planners that produce an executor's own plan form (:attr:`SelectionMode.gpu_planners`);
- its calibration: the candidate grid (:attr:`SelectionMode.grid_type`), the measurement of one call
  (:meth:`SelectionMode.measure`) and the candidate table the fit ranks (:meth:`SelectionMode.candidates`);
- its cost coefficients (:meth:`SelectionMode.cost_coefficients`);
- its profile fields.

:class:`~isa_plugin.ISAConfig`, calibration, profiles and the CLI ask the mode through this interface
and never compare mode names. A mode registers itself with :func:`register_mode`; the package's own modes
(``fixed``, ``adaptive``) are registered when :mod:`isa_plugin.selection` is imported, and a mode defined
anywhere else (a test file, a user's module) is registered the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..kernels.counts import keep_count
from ..layout import CONTEXT, TARGET, BlockLayout
from ..named import NamedRegistry
from ..plan import BlockPlan
from ..validation import as_tuple, per_head_tensor

__all__ = ["SelectionMode", "CandidateTable", "register_mode", "unregister_mode", "get_mode", "registered_modes", "DEFAULT_MODE",
           "context_selection", "top_mask", "plan_from_pooled", "grid_index"]

#: the mode a config or a profile entry without ``mode`` uses (ISA's fixed ratios)
DEFAULT_MODE = "fixed"

def register_mode(mode: "SelectionMode") -> "SelectionMode":
    """Make ``mode`` available by its name (``ISAConfig(mode=name)``, profiles, calibration grids).

    Args:
        mode: an instance of a :class:`SelectionMode` subclass with a unique ``name``.

    Returns:
        ``mode``.

    Raises:
        TypeError: not a :class:`SelectionMode`. ValueError: no name, or the name is taken by another mode.

    Example:
        >>> register_mode(MyTopKMode())   # doctest: +SKIP
    """
    return _MODES.register(mode)


def unregister_mode(name: str) -> None:
    """Remove the mode called ``name`` (a no-op when none is registered); the package's modes cannot be removed.

    Raises:
        ValueError: ``name`` is one of the package's own modes.
    """
    if name in _OWN:
        raise ValueError(f"the package's own mode {name!r} cannot be unregistered")
    _MODES.remove(name)


def get_mode(name: str) -> "SelectionMode":
    """The registered mode called ``name``.

    Raises:
        ValueError: no such mode (the message lists the registered ones).
    """
    try:
        return _MODES.get(name)
    except ValueError:
        raise ValueError(f"mode={name!r} is not supported; supported: {sorted(_MODES.all())}") from None


def registered_modes() -> Dict[str, "SelectionMode"]:
    """Name -> mode, in registration order (the package's modes first)."""
    return _MODES.all()


# ------------------------------------------------------------------------------------ shared steps
def top_mask(scores: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mark the ``count`` highest ``scores`` among ``valid`` entries along the last dim (stable ties: the
    lower index wins). ``count`` broadcasts against ``scores.shape[:-1]``."""
    s = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return (rank < count.unsqueeze(-1)) & valid


def context_selection(P: torch.Tensor, blocks: BlockLayout, alpha_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ISA's context pre-selection: keep the ⌈α_s·C⌉ context blocks target queries attend to most.

    Args:
        P: [B, H, nb, nb] pooled attention (softmax of q̄ k̄ᵀ · scale over all key blocks).
        blocks: the blocking (on P's device); alpha_s: [H] float64.

    Returns:
        ``(kv_keep, saliency)``: [B, H, nb] bool, key block is in KV'; [B, H, nb] saliency (Σ over target
        query blocks of P, 0 off context blocks). Ties keep the lower block index.
    """
    B, H, nb, _ = P.shape
    is_t, is_c = blocks.kinds == TARGET, blocks.kinds == CONTEXT
    saliency = (P * is_t[None, None, :, None]).sum(dim=2) * is_c  # [B, H, nb]
    n_ctx = blocks.count(CONTEXT)  # host-side count: no synchronisation
    keep_ctx = top_mask(saliency, is_c.expand(B, H, nb), keep_count(alpha_s, n_ctx)[None, :].expand(B, H))
    return ~is_c | keep_ctx, saliency


def grid_index(values, v: float):
    """The position of ``v`` among a grid's candidate values (within 1e-9), or None."""
    for i, g in enumerate(values):
        if abs(g - v) <= 1e-9:
            return i
    return None


def plan_from_pooled(mode: "SelectionMode", qbar: torch.Tensor, kbar: torch.Tensor, blocks: BlockLayout, settings: Any,
                     scale: float, share_plan: bool = False) -> BlockPlan:
    """``mode``'s plan from block means q̄, k̄ [B, H, nb, D]; with ``share_plan`` one plan from the batch
    means serves every batch entry (the rule for every mode)."""
    B = qbar.shape[0]
    if share_plan and B > 1:
        return mode.plan(qbar.mean(0, keepdim=True), kbar.mean(0, keepdim=True), blocks, settings, scale).expand_batch(B)
    return mode.plan(qbar, kbar, blocks, settings, scale)


@functools.lru_cache(maxsize=256)
def _per_head_tensors(mode: "SelectionMode", settings: Any, num_heads: int, device: Optional[str]) -> Dict[str, torch.Tensor]:
    """:meth:`SelectionMode.per_head`, built once per (settings, heads, device): planning a call then copies no
    settings to the device (a CUDA graph can capture it). Callers must not modify the tensors."""
    out = {}
    for n in mode.per_head_fields:
        v = getattr(settings, n)
        if v is None:
            continue
        dtype = torch.int64 if all(isinstance(x, int) and not isinstance(x, bool) for x in as_tuple(v)) else torch.float64
        out[n] = per_head_tensor(v, num_heads, n, dtype, device)
    return out


# ------------------------------------------------------------------------------------ calibration
@dataclass
class CandidateTable:
    """A mode's calibration candidates of one layer, in the form the fit ranks them.

    Attributes:
        num: [H, 2, C] float64, Σ|o − o*|₁ per head, query kind (target, context) and candidate.
        den: [H, 2] float64, Σ|o*|₁ of the same tokens.
        cost: [H, C] float64 per-head cost of every candidate, or [C] when every head costs the same.
        dense_head: cost of one head computed exactly (the per-head fit's "dense" option).
        call_cost: the per-call constant of the mode's kernels.
        uniform_groups: candidate index lists; the layer-wide fit takes the best of each group in turn.
        head_groups: candidate index lists; a per-head choice takes every head's candidate from one group.
    """

    num: torch.Tensor
    den: torch.Tensor
    cost: torch.Tensor
    dense_head: float
    call_cost: float
    uniform_groups: List[torch.Tensor]
    head_groups: List[torch.Tensor]


class SelectionMode:
    """Base class of a selection mode (see the module docstring). Subclasses set the class attributes and
    implement :meth:`plan`; calibration works through the generic plan measurement unless a mode overrides
    :meth:`measure` / :meth:`candidates`.

    Class attributes:
        name: the mode's name (``ISAConfig(mode=name)``).
        settings_type: frozen dataclass of the mode's settings; its ``__post_init__`` validates.
        spec: where the mode is specified (a document).
        per_head_fields: settings that may hold one value per head.
        profile_fields: settings a profile entry always lists; ``optional_profile_fields`` are listed
            when not None; every other setting must keep its default in a profile.
        legacy_profile_fields: keys older profile entries of this mode may hold (read and ignored).
        grid_type: the mode's calibration grid (a frozen dataclass of candidate value tuples with a
            ``candidates()`` method listing settings, unless the mode overrides :meth:`measure`).
        gpu_planners: executor name -> planner producing that executor's plan form
            (:mod:`isa_plugin.executors`); other executors run :meth:`plan`'s plans.
        executors: the executors ``backend="auto"`` tries on a GPU, in order of preference.
    """

    name: str = ""
    settings_type: type = None
    spec: str = ""
    per_head_fields: Tuple[str, ...] = ()
    profile_fields: Tuple[str, ...] = ()
    optional_profile_fields: Tuple[str, ...] = ()
    legacy_profile_fields: Tuple[str, ...] = ()
    grid_type: type = None
    gpu_planners: Mapping[str, Callable] = {}
    executors: Tuple[str, ...] = ("sparse", "flex")

    # ------------------------------------------------------------------ settings
    def settings(self, block_size: int, **values) -> Any:
        """Build and validate the mode's settings from keyword values (``block_size`` is the call's).

        Raises:
            TypeError: a keyword that is not one of the mode's settings (the message lists them); ValueError /
                TypeError from the settings' own validation.
        """
        names = [f.name for f in dataclasses.fields(self.settings_type)]
        unknown = [k for k in values if k not in names]
        if unknown:
            owners = {k: [m.name for m in _MODES.all().values() if m is not self and k in m.setting_names()] for k in unknown}
            hint = "; ".join(f"{k} is a setting of mode {o[0]!r} (pass mode={o[0]!r})" for k, o in owners.items() if o)
            raise ValueError(f"ISAConfig {unknown} are not settings of mode {self.name!r} (its settings: {names})"
                             + (f"; {hint}" if hint else ""))
        return self.resolve(self.settings_type(**values), block_size)

    def resolve(self, settings: Any, block_size: int) -> Any:
        """Check settings that depend on the block size and fill defaults derived from it (default: none)."""
        return settings

    def setting_names(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self.settings_type)]

    def defaults(self) -> Dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.settings_type)}

    def to_dict(self, settings: Any) -> Dict[str, Any]:
        """Plain-Python settings (lists for per-head values)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}

    def per_head(self, settings: Any, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """Every per-head setting as a [num_heads] tensor (float64; int64 for integer settings).

        Raises:
            ValueError: a per-head value whose length is not ``num_heads``.
        """
        dev = None if device is None else str(torch.device(device))
        try:
            return dict(_per_head_tensors(self, settings, int(num_heads), dev))
        except TypeError:  # settings that cannot be hashed (a user mode's): built for this call
            return dict(_per_head_tensors.__wrapped__(self, settings, int(num_heads), dev))

    def select_heads(self, settings: Any, start: int, stop: int) -> Any:
        """The settings of heads ``start … stop − 1`` (per-head values sliced, scalars kept)."""
        changes = {n: getattr(settings, n)[start:stop] for n in self.per_head_fields if isinstance(getattr(settings, n), tuple)}
        return dataclasses.replace(settings, **changes) if changes else settings

    def is_dense(self, settings: Any) -> bool:
        """True when the mode's plan is exactly dense attention for these settings."""
        return False

    def call_pairs(self, settings: Any, layout, block_size: int, heads: int) -> Optional[Tuple[float, float]]:
        """(exact pairs, pseudo-key pairs) of one batch entry of a call with this layout, summed over ``heads``,
        known before planning (:mod:`isa_plugin.dispatch` ranks executors by them); None when they depend on
        the inputs (the default: executors are then tried in the order of :attr:`executors`)."""
        return None

    def pseudo_block(self, settings: Any, block_size: int) -> int:
        """Tokens per pseudo-key of the mode's plans (default: one pseudo-key per block)."""
        return block_size

    def pseudo_keys(self, settings: Any) -> str:
        """How the mode's plans form their pseudo-keys (default: means, :mod:`isa_plugin.kernels.pseudo`)."""
        return "mean"

    # ------------------------------------------------------------------ planning
    def plan(self, qbar: torch.Tensor, kbar: torch.Tensor, blocks: BlockLayout, settings: Any, scale: float) -> BlockPlan:
        """The plan for block means q̄, k̄ [B, H, nb, D] (float32 or float64) with softmax ``scale``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ calibration
    def default_grid(self, block_size: int) -> Any:
        """The grid ``isa calibrate`` measures for this mode."""
        return self.grid_type()

    def check_grid(self, grid: Any, block_size: int) -> None:
        """Raise ``ValueError`` for candidates that cannot run at ``block_size`` (checked before a calibration
        runs; default: none)."""

    def grid_to_dict(self, grid: Any) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(grid).items()}

    def grid_from_dict(self, d: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(self.grid_type)}
        return self.grid_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def measure(self, q, k, v, layout, grid, *, block_size: int, sampler, scale: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Statistics of one call (one batch entry, q/k/v [N, H, D]) for every candidate of ``grid``.

        The default measures the plans of ``grid.candidates()`` on sampled tokens
        (:func:`~isa_plugin.selection.measure.measure_plans`): ``{"num": [H, 2, C], "den": [H, 2],
        "pairs": [H, C, 2, 2]}``.
        """
        from .measure import measure_plans, sampled_call

        cands = list(grid.candidates())
        call = sampled_call(q, k, v, layout, block_size, sampler, scale)
        out = self.zero_stats(q.shape[1], grid, q.device)
        if call is None:
            return out
        plans = {(i,): self.plan(call.qbar, call.kbar, call.blocks, self.settings(block_size, **c), call.scale)
                 for i, c in enumerate(cands)}
        pseudo = sorted({self.pseudo_block(self.settings(block_size, **c), block_size) for c in cands})
        r = measure_plans(call, plans, pseudo, (len(cands),))
        ps_of = [pseudo.index(self.pseudo_block(self.settings(block_size, **c), block_size)) for c in cands]
        idx = torch.arange(len(cands))
        out["num"] += r["num"][:, :, idx, ps_of]
        out["den"] += r["den"]
        out["pairs"] += r["pairs"][:, idx, ps_of]
        return out

    def zero_stats(self, heads: int, grid: Any, device=None) -> Dict[str, torch.Tensor]:
        """The statistics :meth:`measure` returns, all zero (accumulators)."""
        C = len(list(grid.candidates()))
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return {"num": z(heads, 2, C), "den": z(heads, 2), "pairs": z(heads, C, 2, 2)}

    def cost_coefficients(self, cost_model) -> Tuple[float, float, float]:
        """(time per exact pair, per (query, pseudo-key) pair, per call) of the executor this mode runs on."""
        return cost_model.adaptive_coefficients()

    def candidates(self, stats: Dict[str, torch.Tensor], grid: Any, layer, cost_model) -> CandidateTable:
        """The candidate table of one layer's accumulated statistics (``layer``: a
        :class:`~isa_plugin.calibration.statistics.LayerErrorStats` for token counts, heads and calls)."""
        a, b, c = self.cost_coefficients(cost_model)
        scale = cost_model.dim_scale(layer.head_dim)
        pairs = stats["pairs"] / max(layer.calls, 1)  # [H, C, rows, (exact, pseudo)]
        cost = ((a * pairs[..., 0] + b * pairs[..., 1]) * scale).sum(-1)  # [H, C]
        n = sum(layer.mean_tokens().values())
        every = torch.arange(cost.shape[1])
        return CandidateTable(num=stats["num"], den=stats["den"], cost=cost, dense_head=a * n * n * scale, call_cost=c,
                              uniform_groups=[every], head_groups=[every])

    def settings_for(self, grid: Any, choice: Sequence[int]) -> Dict[str, Any]:
        """Settings (keyword values) of a per-head candidate choice (``-1``: the head computed exactly)."""
        cands = list(grid.candidates())
        exact = self.exact_settings()
        per = [exact if c < 0 else cands[c] for c in choice]
        out = {}
        for k in per[0]:
            vals = tuple(p[k] for p in per)
            out[k] = vals[0] if len(set(vals)) == 1 else vals
        return out

    def exact_settings(self) -> Dict[str, Any]:
        """Settings under which the mode computes a head exactly (the per-head fit's dense option)."""
        raise NotImplementedError

    def candidate_index(self, grid: Any, settings: Any, heads: int) -> List[int]:
        """Per head, the candidate of ``grid`` that ``settings`` select (``-1``: computed exactly).

        Raises:
            ValueError: settings outside the grid.
        """
        cands = list(grid.candidates())
        out = []
        for h in range(heads):
            mine = {k: (v[h] if isinstance(v, tuple) else v) for k, v in self.to_dict(settings).items()}
            mine = {k: (v[h] if isinstance(v, list) else v) for k, v in mine.items()}
            hit = [i for i, c in enumerate(cands) if all(mine.get(k) == x for k, x in c.items())]
            if hit:
                out.append(hit[0])
            elif all(mine.get(k) == x for k, x in self.exact_settings().items()):
                out.append(-1)
            else:
                raise ValueError(f"head {h}: settings {mine} are not on the calibration grid {self.grid_to_dict(grid)}")
        return out

    def diagnostics(self, stats: Dict[str, torch.Tensor], grid: Any, calls: int) -> Dict[str, Any]:
        """What the mode's statistics say about a layer beyond its errors (recorded in profiles)."""
        return {}


_MODES: NamedRegistry[SelectionMode] = NamedRegistry("selection mode", SelectionMode)
#: the package's own modes (registered by :mod:`isa_plugin.selection`), which cannot be unregistered
_OWN = (DEFAULT_MODE, "adaptive")
