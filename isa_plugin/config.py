"""ISA configuration: the three ratios, block size, sharpness metric and backend."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

__all__ = ["ISAConfig", "AdaptiveSettings", "Ratio", "SHARPNESS_METRICS", "BACKENDS", "MODES", "RATIO_NAMES",
           "ADAPTIVE_NAMES", "validate_ratio", "validate_budget"]

Ratio = Union[float, Tuple[float, ...]]
Count = Union[int, Tuple[int, ...]]
#: selection modes: ISA's fixed ratios (ISA.md) or per-query-block selection by pooled mass (ADAPTIVE.md)
MODES = ("fixed", "adaptive")
#: the adaptive mode's settings in ISAConfig (used only with ``mode="adaptive"``)
ADAPTIVE_NAMES = ("mass", "context_mass", "min_blocks", "max_blocks", "pseudo_block")
#: the sharpness metrics ISA ranks query blocks by (``ISAConfig.sharpness``, calibration grids, profiles)
SHARPNESS_METRICS = ("topk_mass", "l2")
BACKENDS = ("auto", "reference", "triton")
#: the three ratios of ISA, in the order configs and profiles list them
RATIO_NAMES = ("alpha_s", "alpha_f", "alpha_ns")



def _per_head(name: str, value: Any, one: Callable[..., Any]):
    """``one(value)`` for a single value, or a tuple of ``one(v, "[i]")`` for a per-head sequence (a tensor is
    read as a list); an empty sequence raises ``ValueError`` naming ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list; give one value per head or a single number")
        return tuple(one(v, f"[{i}]") for i, v in enumerate(value))
    return one(value)

def validate_ratio(name: str, value: Any) -> Ratio:
    """Check one ISA ratio (α_s, α_f, α_ns, or a fraction like them): a number in (0, 1], or one per head.

    Args:
        name: how the value is named in messages, e.g. ``"ISAConfig.alpha_s"`` or ``"alpha_s"``.
        value: a number, or a sequence / 1-D tensor [H] of numbers (one per attention head).

    Returns:
        ``float``, or a tuple of floats for a sequence.

    Raises:
        TypeError: a value that is not a real number (bools included).
        ValueError: a value outside (0, 1] or NaN, or an empty sequence.

    Example:
        >>> validate_ratio("alpha_f", [0.5, 1])
        (0.5, 1.0)
        >>> validate_ratio("alpha_s", 0)
        Traceback (most recent call last):
        ValueError: alpha_s=0.0 is out of range; use a value in (0, 1] (1 = keep everything)
    """

    def one(v, where=""):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}{where}={v!r} must be a number in (0, 1]")
        v = float(v)
        if not (0.0 < v <= 1.0) or math.isnan(v):
            raise ValueError(f"{name}{where}={v!r} is out of range; use a value in (0, 1] (1 = keep everything)")
        return v

    return _per_head(name, value, one)


def validate_budget(budget: Any, name: str = "budget") -> float:
    """Check an error budget: the relative L1 error of the attention output, a number in (0, 1).

    Every entry point that takes an error budget (``fit_profile``, ``calibrate``, the CLI) checks it here.

    Args:
        budget: the budget, e.g. ``0.05`` for 5% relative L1.
        name: how the value is named in the message (e.g. ``"context budget"``).

    Returns:
        The budget as a ``float``.

    Raises:
        ValueError: one line naming the value and the fix, for anything but a real number in (0, 1).

    Example:
        >>> validate_budget(0.05)
        0.05
        >>> validate_budget(2)
        Traceback (most recent call last):
        ValueError: budget=2.0 is out of range; use a value in (0, 1), e.g. 0.05
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"{name}={budget!r} must be a number in (0, 1), e.g. 0.05")
    value = float(budget)
    if not (0.0 < value < 1.0):  # NaN fails too
        raise ValueError(f"{name}={value!r} is out of range; use a value in (0, 1), e.g. 0.05")
    return value


def _validate_count(name: str, value: Any, low: int) -> Count:
    """An integer >= ``low``, or one per head (tuple)."""

    def one(v, where=""):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}{where}={v!r} must be an integer >= {low}")
        if int(v) < low:
            raise ValueError(f"{name}{where}={int(v)} must be >= {low}")
        return int(v)

    return _per_head(name, value, one)


def _heads(value, num_heads: int, name: str, dtype, device) -> torch.Tensor:
    if isinstance(value, tuple):
        if len(value) != num_heads:
            raise ValueError(f"{name} has {len(value)} per-head values but the attention call has {num_heads} heads; "
                             f"give {num_heads} values or a single number")
        return torch.tensor(value, dtype=dtype, device=device)
    return torch.full((num_heads,), value, dtype=dtype, device=device)


@dataclass(frozen=True)
class AdaptiveSettings:
    """The adaptive mode's knobs (``docs/ADAPTIVE.md``); every per-head field may be one value per head.

    :class:`ISAConfig` with ``mode="adaptive"`` builds one (:attr:`ISAConfig.adaptive`); the adaptive
    planners and executors take it.

    Args:
        mass: p in (0, 1], the pooled attention mass a query block's exact key blocks must hold. Per head.
        context_mass: the same for context query blocks (None: ``mass``). Per head.
        min_blocks: at least this many exact non-text key blocks per query block (>= 1). Per head.
        max_blocks: at most this many (0 = no bound; else >= ``min_blocks``). Per head.
        pseudo_block: tokens per pseudo-key; 1 <= s <= block_size and s divides block_size. None: block_size
            (one pseudo-key per block, as in the fixed mode).
        alpha_s: fraction of context blocks kept (the fixed mode's context pre-selection). Per head.
        block_size: tokens per block (per span).
        share_plan: one plan from the batch-mean block means for every batch entry.

    Raises:
        TypeError / ValueError: a value of the wrong type or range, naming the field.

    Example:
        >>> s = AdaptiveSettings(mass=(0.9, 0.95), pseudo_block=16)
        >>> s.per_head(2)["mass"].tolist()
        [0.9, 0.95]
    """

    mass: Ratio = 0.9
    min_blocks: Count = 1
    max_blocks: Count = 0
    pseudo_block: Optional[int] = None
    alpha_s: Ratio = 1.0
    context_mass: Optional[Ratio] = None
    block_size: int = 64
    share_plan: bool = False

    def __post_init__(self):
        object.__setattr__(self, "mass", validate_ratio("mass", self.mass))
        if self.context_mass is not None:
            object.__setattr__(self, "context_mass", validate_ratio("context_mass", self.context_mass))
        object.__setattr__(self, "alpha_s", validate_ratio("alpha_s", self.alpha_s))
        object.__setattr__(self, "min_blocks", _validate_count("min_blocks", self.min_blocks, 1))
        object.__setattr__(self, "max_blocks", _validate_count("max_blocks", self.max_blocks, 0))
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
            raise ValueError(f"block_size={bs!r} must be a positive integer")
        object.__setattr__(self, "block_size", int(bs))
        s = self.block_size if self.pseudo_block is None else self.pseudo_block
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"pseudo_block={s!r} must be an integer dividing block_size={self.block_size}")
        if not (1 <= int(s) <= self.block_size) or self.block_size % int(s):
            raise ValueError(f"pseudo_block={s!r} must divide block_size={self.block_size} (e.g. 16 or {self.block_size})")
        object.__setattr__(self, "pseudo_block", int(s))
        if not isinstance(self.share_plan, bool):
            raise TypeError(f"share_plan={self.share_plan!r} must be True or False")
        lo, hi = _as_tuple(self.min_blocks), _as_tuple(self.max_blocks)
        n = max(len(lo), len(hi))
        if len(lo) in (1, n) and len(hi) in (1, n):
            lo, hi = lo * (n // len(lo)), hi * (n // len(hi))
            bad = [h for h in range(n) if hi[h] and hi[h] < lo[h]]
            if bad:
                raise ValueError(f"max_blocks < min_blocks (heads {bad}); use max_blocks >= min_blocks or 0 (no bound)")

    def per_head(self, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """``mass``, ``context_mass`` (``mass`` where None), ``alpha_s`` (float64) and ``min_blocks``,
        ``max_blocks`` (int64) as [num_heads] tensors.

        Raises:
            ValueError: a per-head value whose length differs from ``num_heads``.
        """
        return {
            "mass": _heads(self.mass, num_heads, "mass", torch.float64, device),
            "context_mass": _heads(self.mass if self.context_mass is None else self.context_mass, num_heads,
                                   "context_mass", torch.float64, device),
            "alpha_s": _heads(self.alpha_s, num_heads, "alpha_s", torch.float64, device),
            "min_blocks": _heads(self.min_blocks, num_heads, "min_blocks", torch.int64, device),
            "max_blocks": _heads(self.max_blocks, num_heads, "max_blocks", torch.int64, device),
        }

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


_ADAPTIVE_DEFAULTS = {"mass": 0.9, "context_mass": None, "min_blocks": 1, "max_blocks": 0, "pseudo_block": None}


@dataclass(frozen=True)
class ISAConfig:
    """Settings of one ISA attention call.

    Args:
        alpha_s: fraction of context key blocks kept (by saliency); the rest are dropped. (0, 1].
        alpha_f: fraction of non-text query blocks (the sharpest) sent to exact attention over KV'. (0, 1].
        alpha_ns: fraction of non-text KV' blocks each Taylor query block computes exactly; the others
            enter as block means. (0, 1].
        block_size: tokens per block (each span is blocked separately). Default 64.
        sharpness: ``"topk_mass"`` (mass of the top ``topk_fraction`` target key blocks of the pooled row,
            default) or ``"l2"`` (squared norm of the pooled row).
        topk_fraction: k = max(1, floor(topk_fraction * #target blocks)) for ``"topk_mass"``.
        backend: ``"auto"`` (Triton kernels on CUDA when eligible, else the PyTorch reference),
            ``"reference"`` or ``"triton"``.
        share_plan: compute one plan for the whole batch, from the batch mean of the block means q̄, k̄,
            and use it for every batch entry (e.g. the cond/uncond pair of classifier-free guidance).
            Default False: every batch entry gets its own selections. Applies to the entries of one call
            that share a layout; the pseudo-keys (k̄, v̄) stay per entry.
        mode: ``"fixed"`` (the ratios above, ``ISA.md``; default) or ``"adaptive"`` (``docs/ADAPTIVE.md``:
            per query block, the fewest key blocks holding ``mass`` of its pooled attention exactly, the
            others as pseudo-keys; ``alpha_s`` prunes context as in the fixed mode, ``alpha_f``,
            ``alpha_ns``, ``sharpness`` and ``topk_fraction`` are not used).
        mass: adaptive mode: pooled-mass threshold p in (0, 1]. Default 0.9.
        context_mass: adaptive mode: the threshold of context query blocks (None: ``mass``).
        min_blocks, max_blocks: adaptive mode: bounds on exact non-text key blocks per query block
            (``max_blocks=0``: no bound). Defaults 1 and 0.
        pseudo_block: adaptive mode: tokens per pseudo-key (divides ``block_size``); None = ``block_size``.

    Each ratio (and ``mass``, ``context_mass``, ``min_blocks``, ``max_blocks``) may be a sequence with one value per attention
    head. The adaptive settings may only be set with ``mode="adaptive"``; a fixed-mode config's dict and
    encoding do not list them.

    Raises:
        TypeError / ValueError: a ratio outside (0, 1], a bad block size, unknown metric, backend or mode,
            bad adaptive settings, or adaptive settings given with ``mode="fixed"``.

    Example:
        >>> cfg = ISAConfig(alpha_s=0.25, alpha_f=(0.5, 0.75))   # per-head alpha_f for 2 heads
        >>> ISAConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> ada = ISAConfig(mode="adaptive", mass=(0.9, 0.95), pseudo_block=16, alpha_s=0.5)
        >>> ISAConfig.decode(ada.encode()) == ada
        True
    """

    alpha_s: Ratio = 0.125
    alpha_f: Ratio = 0.5
    alpha_ns: Ratio = 0.0625
    block_size: int = 64
    sharpness: str = "topk_mass"
    topk_fraction: float = 0.0625
    backend: str = "auto"
    share_plan: bool = False
    mode: str = "fixed"
    mass: Ratio = 0.9
    min_blocks: Count = 1
    max_blocks: Count = 0
    pseudo_block: Optional[int] = None
    context_mass: Optional[Ratio] = None

    def __post_init__(self):
        for name in RATIO_NAMES:
            object.__setattr__(self, name, validate_ratio(f"ISAConfig.{name}", getattr(self, name)))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, numbers.Integral) or self.block_size < 1:
            raise ValueError(f"ISAConfig.block_size={self.block_size!r} must be a positive integer (default 64)")
        object.__setattr__(self, "block_size", int(self.block_size))
        if self.sharpness not in SHARPNESS_METRICS:
            raise ValueError(f"ISAConfig.sharpness={self.sharpness!r} is not supported; supported: {list(SHARPNESS_METRICS)}")
        object.__setattr__(self, "topk_fraction", validate_ratio("ISAConfig.topk_fraction", self.topk_fraction))
        if isinstance(self.topk_fraction, tuple):
            raise TypeError("ISAConfig.topk_fraction must be a single number")
        if self.backend not in BACKENDS:
            raise ValueError(f"ISAConfig.backend={self.backend!r} is not supported; supported: {list(BACKENDS)}")
        if not isinstance(self.share_plan, bool):
            raise TypeError(f"ISAConfig.share_plan={self.share_plan!r} must be True or False")
        if self.mode not in MODES:
            raise ValueError(f"ISAConfig.mode={self.mode!r} is not supported; supported: {list(MODES)}")
        if self.mode == "fixed":
            set_ = [n for n in ADAPTIVE_NAMES if getattr(self, n) != _ADAPTIVE_DEFAULTS[n]]
            if set_:
                raise ValueError(f"ISAConfig {set_} are settings of the adaptive mode; pass mode='adaptive' to use them")
        try:
            ada = AdaptiveSettings(mass=self.mass, context_mass=self.context_mass, min_blocks=self.min_blocks, max_blocks=self.max_blocks,
                                   pseudo_block=self.pseudo_block, alpha_s=self.alpha_s, block_size=self.block_size,
                                   share_plan=self.share_plan)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ISAConfig.{e}") from None
        for n in ("mass", "context_mass", "min_blocks", "max_blocks"):
            object.__setattr__(self, n, getattr(ada, n))
        if self.mode == "adaptive":
            object.__setattr__(self, "pseudo_block", ada.pseudo_block)
        object.__setattr__(self, "_adaptive", ada)
        # computed once so that traced code (torch.compile) only reads an attribute
        object.__setattr__(self, "_encoded", json.dumps(self.to_dict(), sort_keys=True))

    # -------------------------------------------------------------- helpers
    @property
    def adaptive(self) -> AdaptiveSettings:
        """The adaptive mode's settings (meaningful with ``mode="adaptive"``)."""
        return self._adaptive

    @property
    def is_dense(self) -> bool:
        """True when ISA computes exactly dense attention: every ratio 1 (fixed mode); in the adaptive mode
        ``alpha_s`` 1 and either ``mass`` and ``context_mass`` 1 or ``pseudo_block`` 1."""
        if self.mode == "adaptive":
            return all(v == 1.0 for v in _as_tuple(self.alpha_s)) and (
                all(v == 1.0 for v in _as_tuple(self.mass) + _as_tuple(self.context_mass or 1.0)) or self.pseudo_block == 1)
        return all(v == 1.0 for name in RATIO_NAMES for v in _as_tuple(getattr(self, name)))

    def _per_head_names(self) -> Tuple[str, ...]:
        return RATIO_NAMES + (("mass", "context_mass", "min_blocks", "max_blocks") if self.mode == "adaptive" else ())

    @property
    def num_heads(self) -> int | None:
        """The head count implied by per-head values, or None when all are scalars (-1 when they disagree)."""
        lens = {len(getattr(self, n)) for n in self._per_head_names() if isinstance(getattr(self, n), tuple)}
        if len(lens) > 1:
            return -1
        return lens.pop() if lens else None

    def per_head(self, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """The three ratios as float64 tensors of shape [num_heads]; in the adaptive mode also ``mass``,
        ``context_mass`` (float64), ``min_blocks`` and ``max_blocks`` (int64).

        Raises:
            ValueError: a per-head value whose length differs from ``num_heads``.
        """
        out = {}
        if self.mode == "adaptive":
            try:
                ada = self._adaptive.per_head(num_heads, device)
            except ValueError as e:
                raise ValueError(f"ISAConfig.{e}") from None
            out.update({n: ada[n] for n in ("mass", "context_mass", "min_blocks", "max_blocks")})
        for name in RATIO_NAMES:
            v = getattr(self, name)
            if isinstance(v, tuple):
                if len(v) != num_heads:
                    raise ValueError(
                        f"ISAConfig.{name} has {len(v)} per-head values but the attention call has {num_heads} heads; "
                        f"give {num_heads} values or a single number"
                    )
                out[name] = torch.tensor(v, dtype=torch.float64, device=device)
            else:
                out[name] = torch.full((num_heads,), v, dtype=torch.float64, device=device)
        return out

    def replace(self, **changes) -> "ISAConfig":
        d = self.to_dict()
        d.update(changes)
        return ISAConfig.from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python dict (lists for per-head values), safe for YAML/JSON. A fixed-mode config lists
        neither ``mode`` nor the adaptive settings (its dict is what it was before the adaptive mode)."""
        d = {}
        for f in fields(self):
            if self.mode == "fixed" and f.name in ("mode",) + ADAPTIVE_NAMES:
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def encode(self) -> str:
        """The config as one JSON string, the form custom ops take."""
        return self._encoded

    @classmethod
    def decode(cls, text: str) -> "ISAConfig":
        """Inverse of :meth:`encode`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ISAConfig":
        """Inverse of :meth:`to_dict`. Unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise TypeError(f"ISAConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ISAConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _as_tuple(v: Ratio) -> Tuple[float, ...]:
    return v if isinstance(v, tuple) else (v,)
