"""Kernel-time model used to rank ISA settings: time ≈ a·exact pairs + b·approximated pairs + c.

The kernel benchmark writes ``isa_plugin/kernels/cost_model.json`` per GPU. Accepted shapes:

- ``{"a": ..., "b": ..., "c": ..., "dense_a": ..., "dense_c": ...}`` (one model), or
- ``{"cards": {"<GPU name>": {...one model...}, ...}, "default": "<GPU name>"}``, or
- ``{"<GPU name>": {...}, ...}``;
- the kernel benchmark's own entries (``benchmarks/bench_attention.py --cost-model``):
  ``{"cards": {"<GPU>": {"ms_per_gexact_pair", "ms_per_gapprox_pair", "ms_per_call",
  "dense_cudnn_ms_per_gpair", ...}}}`` — milliseconds per 10⁹ pairs at head_dim 128 (pairs scale with D/128).
  Negative least-squares coefficients are clamped to 0.

``a`` is the time per exactly computed (query token, key token) pair (per head), ``b`` per query token
and block-mean pseudo-key, ``c`` a per-call constant (planning, launches). Dense attention costs
``dense_a·N²·H + dense_c`` (default: ``a`` and 0). Only ratios matter for fitting, so units are free.

A card's entry may also hold ``executors``: per executor (``"triton"``, ``"sparse"``, ``"flex"``) its own
``ms_per_gexact_pair``, ``ms_per_gpseudo_pair`` and ``ms_per_call``, measured by ``benchmarks/bench_pareto.py
--executor-costs``. :mod:`isa_plugin.dispatch` runs a call on the eligible executor they predict fastest. The card's
own coefficients are those of the ISA kernels (``"triton"``), and a card with ``executors`` only takes them from
its ``"triton"`` entry.

Without that file, :data:`DEFAULT_COST_MODEL` counts pairs (a = b = 1, c = 0): the predicted relative cost
is then :meth:`isa_plugin.plan.BlockPlan.relative_cost`.

The adaptive mode (``docs/ADAPTIVE.md``) runs another kernel (FlexAttention) and has its own coefficients,
:meth:`CostModel.adaptive_coefficients`: ``adaptive_a`` per exact pair, ``adaptive_b`` per (query, pseudo-key)
pair, ``adaptive_c`` per call (benchmark keys ``adaptive_ms_per_gexact_pair``, ``adaptive_ms_per_gpseudo_pair``,
``adaptive_ms_per_call``). Where a measured GPU model lacks them, exact and pseudo pairs cost
``dense_a / FLEX_DENSE_RATE`` each (FlexAttention ran variable block masks at about 0.69 of cuDNN's dense rate
on an H200) and the call constant is ``c``; the pair-count model counts pairs of both modes alike.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..selection.fixed import heads_pairs

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "load_cost_model", "predict_call_ms", "FLEX_DENSE_RATE"]

#: FlexAttention's rate on variable per-row block masks relative to cuDNN dense attention (H200, N = 65,536,
#: H = 40, 128-token blocks), used for the adaptive mode where a cost model has no measured coefficients
FLEX_DENSE_RATE = 0.69

logger = logging.getLogger(__name__)

_DEFAULT_PATH = Path(__file__).resolve().parent.parent / "kernels" / "cost_model.json"


@dataclass(frozen=True)
class CostModel:
    """time ≈ a·exact pairs + b·approximated pairs + c; dense ≈ dense_a·N²·H + dense_c."""

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0
    dense_a: Optional[float] = None
    dense_c: float = 0.0
    source: str = "default (pair count: a = b = 1, c = 0)"
    head_dim_ref: Optional[int] = None  # pairs are counted at this head_dim (work scales with D / head_dim_ref)
    floor: float = 0.0  # smallest time of one call (host-side launch work bounds small problems)
    adaptive_a: Optional[float] = None  # the adaptive mode's time per exact pair (None: see adaptive_coefficients)
    adaptive_b: Optional[float] = None  # ... per (query token, pseudo-key) pair
    adaptive_c: Optional[float] = None  # ... per call
    # measured coefficients of each executor: (name, a per exact pair, b per (query, pseudo-key) pair, c per call)
    executors: Tuple[Tuple[str, float, float, float], ...] = ()

    def __post_init__(self):
        for n in ("adaptive_a", "adaptive_b", "adaptive_c"):
            v = getattr(self, n)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0):
                raise ValueError(f"cost model {n}={v!r} must be a finite non-negative number")
        if self.adaptive_a is not None and self.adaptive_a <= 0:
            raise ValueError(f"cost model adaptive_a={self.adaptive_a!r} must be positive")
        for n in ("a", "b", "c", "dense_c", "floor"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model {n}={v!r} must be a finite non-negative number")
        if self.a <= 0:
            raise ValueError(f"cost model a={self.a!r} must be positive")
        if self.dense_a is not None and not (isinstance(self.dense_a, numbers.Real) and self.dense_a > 0):
            raise ValueError(f"cost model dense_a={self.dense_a!r} must be positive")

    def dim_scale(self, head_dim: Optional[int]) -> float:
        return head_dim / self.head_dim_ref if (self.head_dim_ref and head_dim) else 1.0

    def time(self, exact_pairs: float, approx_pairs: float, head_dim: Optional[int] = None) -> float:
        """Predicted time of one call (all heads) with these pair counts."""
        return max(self.floor, (self.a * exact_pairs + self.b * approx_pairs) * self.dim_scale(head_dim) + self.c)

    def adaptive_coefficients(self):
        """(a, b, c) of the adaptive mode: time ≈ a·exact pairs + b·pseudo pairs + c (see the module docstring); a card
        without ``adaptive_*`` coefficients but with the block-sparse executor's (``executors.sparse``) uses those."""
        if self.adaptive_a is not None:
            a = self.adaptive_a
            return a, (a if self.adaptive_b is None else self.adaptive_b), (self.c if self.adaptive_c is None else self.adaptive_c)
        sparse = self.executor_coefficients("sparse")
        if sparse is not None:
            return sparse
        if self.dense_a is not None:
            a = self.dense_a / FLEX_DENSE_RATE
            return a, a, self.c
        return self.a, self.a, self.c

    def executor_coefficients(self, name: str) -> Optional[Tuple[float, float, float]]:
        """(a, b, c) of executor ``name``, or None when the model has none for it."""
        for n, a, b, c in self.executors:
            if n == name:
                return a, b, c
        if name == "triton" and self.head_dim_ref is not None:  # a measured card's own coefficients are the ISA kernels'
            return self.a, self.b, self.c
        return None

    def executor_time(self, name: str, exact_pairs: float, pseudo_pairs: float, head_dim: Optional[int] = None) -> Optional[float]:
        """Predicted time of one call on executor ``name`` (None when the model has no coefficients for it)."""
        coef = self.executor_coefficients(name)
        if coef is None:
            return None
        a, b, c = coef
        return (a * exact_pairs + b * pseudo_pairs) * self.dim_scale(head_dim) + c

    def dense_time(self, n_tokens: float, heads: int, head_dim: Optional[int] = None) -> float:
        da = self.a if self.dense_a is None else self.dense_a
        return da * n_tokens * n_tokens * heads * self.dim_scale(head_dim) + self.dense_c

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ()}


DEFAULT_COST_MODEL = CostModel()


def _from_mapping(d: Mapping[str, Any], source: str) -> CostModel:
    ex = d.get("executors")
    if "ms_per_gexact_pair" not in d and "a" not in d and isinstance(ex, Mapping) and isinstance(ex.get("triton"), Mapping):
        # a card measured by the executor benchmark only: the ISA kernels' ("triton") coefficients are the card's own
        t = ex["triton"]
        d = {**d, "ms_per_gexact_pair": t.get("ms_per_gexact_pair"), "ms_per_gapprox_pair": t.get("ms_per_gpseudo_pair", 0.0),
             "ms_per_call": t.get("ms_per_call", 0.0)}
    if "ms_per_gexact_pair" in d:  # the kernel benchmark's least-squares fit, per 1e9 pairs at D = 128
        def num(key, default=0.0):
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{source}: {key}={v!r} is not a number")
            return float(v)

        a = num("ms_per_gexact_pair") / 1e9
        if a <= 0:
            raise ValueError(f"{source}: ms_per_gexact_pair must be positive")
        b, c = max(num("ms_per_gapprox_pair") / 1e9, 0.0), max(num("ms_per_call"), 0.0)
        dense = d.get("dense_cudnn_ms_per_gpair")
        dense_a = num("dense_cudnn_ms_per_gpair") / 1e9 if dense is not None and num("dense_cudnn_ms_per_gpair") > 0 else None
        ada = {}
        if "adaptive_ms_per_gexact_pair" in d:
            ada = dict(adaptive_a=num("adaptive_ms_per_gexact_pair") / 1e9,
                       adaptive_b=max(num("adaptive_ms_per_gpseudo_pair", d["adaptive_ms_per_gexact_pair"]), 0.0) / 1e9,
                       adaptive_c=max(num("adaptive_ms_per_call", d.get("ms_per_call", 0.0)), 0.0))
        return CostModel(a=a, b=b, c=c, dense_a=dense_a, source=source, head_dim_ref=128, floor=max(num("host_floor_ms"), 0.0),
                         executors=_executors(d.get("executors", {}), source), **ada)
    known = {"a", "b", "c", "dense_a", "dense_c", "adaptive_a", "adaptive_b", "adaptive_c"}
    kw = {k: d[k] for k in known if k in d}
    if "a" not in kw:
        raise ValueError(f"{source}: a cost model needs at least 'a' (time per exact pair); got keys {sorted(d)}")
    return CostModel(**kw, source=source)


def _executors(d: Any, source: str) -> Tuple[Tuple[str, float, float, float], ...]:
    """The ``executors`` entry of a card: name -> {ms_per_gexact_pair, ms_per_gpseudo_pair, ms_per_call}, per 1e9
    pairs at head_dim 128 (as the card's own coefficients)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: 'executors' must map executor names to their coefficients, got {type(d).__name__}")
    out = []
    for name, e in d.items():
        vals = []
        for key in ("ms_per_gexact_pair", "ms_per_gpseudo_pair", "ms_per_call"):
            v = e.get(key, 0.0) if isinstance(e, Mapping) else None
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{source}: executors.{name}.{key}={v!r} must be a finite non-negative number")
            vals.append(float(v))
        if vals[0] <= 0:
            raise ValueError(f"{source}: executors.{name}.ms_per_gexact_pair must be positive")
        out.append((str(name), vals[0] / 1e9, vals[1] / 1e9, vals[2]))
    return tuple(out)


def load_cost_model(path: Union[str, Path, None] = None, device_name: Optional[str] = None) -> CostModel:
    """Read the kernel benchmark's cost model, falling back to :data:`DEFAULT_COST_MODEL`.

    Args:
        path: a JSON file; default ``isa_plugin/kernels/cost_model.json`` (missing -> default model).
        device_name: pick this card's entry (default: the current CUDA device; an unknown card gets the
            file's ``default`` entry, else the first). Without CUDA and without an explicit ``path`` or
            ``device_name`` the pair-count model is used: the file describes GPU kernels.

    Raises:
        ValueError: ``path`` was given explicitly and is unreadable or malformed.
    """
    explicit = path is not None
    p = Path(path) if explicit else _DEFAULT_PATH
    if not p.is_file():
        if explicit:
            raise ValueError(f"cost model file {str(p)!r} does not exist")
        return DEFAULT_COST_MODEL
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        if explicit:
            raise ValueError(f"cost model file {str(p)!r} is not valid JSON ({e})") from None
        logger.warning("ignoring unreadable %s (%s); using the pair-count cost model", p, e)
        return DEFAULT_COST_MODEL
    try:
        if isinstance(data, Mapping) and ("a" in data or "ms_per_gexact_pair" in data):
            return _from_mapping(data, str(p))
        cards = data.get("cards", data) if isinstance(data, Mapping) else None
        if not isinstance(cards, Mapping):
            raise ValueError(f"{p}: expected a JSON object")
        cards = {k: v for k, v in cards.items() if isinstance(v, Mapping) and (
            "a" in v or "ms_per_gexact_pair" in v or "triton" in (v.get("executors") or {}))}
        if not cards:
            raise ValueError(f"{p}: no cost model entry with an 'a' coefficient")
        if device_name is None:
            try:
                import torch

                if torch.cuda.is_available():
                    device_name = torch.cuda.get_device_name()
            except Exception:  # pragma: no cover
                device_name = None
            if device_name is None and not explicit:
                logger.info("no CUDA device: ranking ISA settings by pair counts, not by %s", p)
                return DEFAULT_COST_MODEL
        name = None
        if device_name:
            name = next((k for k in cards if k == device_name), None) or next(
                (k for k in cards if k.lower() in device_name.lower() or device_name.lower() in k.lower()), None)
        if name is None and isinstance(data, Mapping) and data.get("default") in cards:
            name = data["default"]
        name = name or next(iter(cards))
        return _from_mapping(cards[name], f"{p} [{name}]")
    except ValueError:
        if explicit:
            raise
        logger.warning("ignoring malformed %s; using the pair-count cost model", p)
        return DEFAULT_COST_MODEL


def predict_call_ms(cost_model: CostModel, ratios: Optional[Mapping[str, Any]], tokens: Mapping[str, int], *,
                    block_size: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """Predicted time of one attention call (all heads and batch entries) under ``cost_model``.

    Args:
        cost_model: e.g. ``load_cost_model(device_name="NVIDIA H200")`` (units: the model's, ms for the
            kernel benchmark's file).
        ratios: ``{"alpha_s", "alpha_f", "alpha_ns"}``, each a number or one per head [H]; None for
            dense attention (the model's dense alternative, ``dense_time``).
        tokens: tokens per kind of one batch entry, e.g. ``{"target": 1536, "context": 1536}``
            (``"text"`` optional); blocks are counted per kind with ``block_size``.
        block_size: ISA block size; heads, head_dim: of the layer; batch: entries per call (2 with CFG).

    Returns:
        the predicted time of the call.

    Raises:
        ValueError: per-head ratios whose length is not ``heads``.

    Example:
        >>> cm = load_cost_model(device_name="NVIDIA H200")
        >>> r = {"alpha_s": 0.125, "alpha_f": 0.5, "alpha_ns": 0.0625}
        >>> t = {"target": 32760, "context": 32760}
        >>> predict_call_ms(cm, None, t, block_size=64, heads=40, head_dim=128) / predict_call_ms(cm, r, t, block_size=64, heads=40, head_dim=128)  # doctest: +SKIP
        2.9...
    """
    n = sum(tokens.values())
    if ratios is None:
        return cost_model.dense_time(n, heads * batch, head_dim)
    blocks = {k: float(math.ceil(v / block_size)) for k, v in tokens.items()}
    exact, approx = heads_pairs(ratios, tokens, blocks, heads)
    return cost_model.time(exact * batch, approx * batch, head_dim)
