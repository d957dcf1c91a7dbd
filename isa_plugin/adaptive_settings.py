"""Settings of ISA's adaptive selection mode (``docs/ADAPTIVE.md``): validation and per-head values."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = ["AdaptiveSettings", "PerHeadFloat", "PerHeadInt"]

PerHeadFloat = Union[float, Tuple[float, ...]]
PerHeadInt = Union[int, Tuple[int, ...]]


def _seq(name: str, value: Any):
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty sequence; give one value per head or a single number")
        return [(v, f"{name}[{i}]") for i, v in enumerate(value)], True
    return [(value, name)], False


def _fraction(name: str, value: Any) -> PerHeadFloat:
    items, is_seq = _seq(name, value)
    out = []
    for v, where in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{where}={v!r} must be a number in (0, 1]")
        v = float(v)
        if math.isnan(v) or not (0.0 < v <= 1.0):
            raise ValueError(f"{where}={v!r} is out of range; use a value in (0, 1] (1 = keep everything)")
        out.append(v)
    return tuple(out) if is_seq else out[0]


def _count(name: str, value: Any, low: int) -> PerHeadInt:
    items, is_seq = _seq(name, value)
    out = []
    for v, where in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{where}={v!r} must be an integer >= {low}")
        if int(v) < low:
            raise ValueError(f"{where}={int(v)} must be >= {low}")
        out.append(int(v))
    return tuple(out) if is_seq else out[0]


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

    Args:
        mass: p in (0, 1], the pooled attention mass a query block's exact key blocks must hold. Per head.
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

    mass: PerHeadFloat = 0.9
    min_blocks: PerHeadInt = 1
    max_blocks: PerHeadInt = 0
    pseudo_block: Optional[int] = None
    alpha_s: PerHeadFloat = 1.0
    block_size: int = 64
    share_plan: bool = False

    def __post_init__(self):
        object.__setattr__(self, "mass", _fraction("mass", self.mass))
        object.__setattr__(self, "alpha_s", _fraction("alpha_s", self.alpha_s))
        object.__setattr__(self, "min_blocks", _count("min_blocks", self.min_blocks, 1))
        object.__setattr__(self, "max_blocks", _count("max_blocks", self.max_blocks, 0))
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
        lo = self.min_blocks if isinstance(self.min_blocks, tuple) else None
        hi = self.max_blocks if isinstance(self.max_blocks, tuple) else None
        n = max(len(lo or ()), len(hi or ()))
        if n:
            los = lo or (self.min_blocks,) * n
            his = hi or (self.max_blocks,) * n
            if len(los) == len(his):
                bad = [h for h in range(n) if his[h] and his[h] < los[h]]
                if bad:
                    raise ValueError(f"max_blocks < min_blocks for heads {bad}; use max_blocks >= min_blocks or 0 (no bound)")
        elif self.max_blocks and self.max_blocks < self.min_blocks:
            raise ValueError(f"max_blocks={self.max_blocks} < min_blocks={self.min_blocks}; use max_blocks >= min_blocks or 0 (no bound)")

    def per_head(self, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """``mass``, ``alpha_s`` (float64) and ``min_blocks``, ``max_blocks`` (int64) as [num_heads] tensors.

        Raises:
            ValueError: a per-head value whose length differs from ``num_heads``.
        """
        return {
            "mass": _heads(self.mass, num_heads, "mass", torch.float64, device),
            "alpha_s": _heads(self.alpha_s, num_heads, "alpha_s", torch.float64, device),
            "min_blocks": _heads(self.min_blocks, num_heads, "min_blocks", torch.int64, device),
            "max_blocks": _heads(self.max_blocks, num_heads, "max_blocks", torch.int64, device),
        }

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
