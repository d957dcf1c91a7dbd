"""ISA configuration: the three ratios, block size, sharpness metric and backend."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Dict, Tuple, Union

import torch

__all__ = ["ISAConfig", "Ratio", "SHARPNESS_METRICS", "BACKENDS", "RATIO_NAMES", "validate_ratio", "validate_budget"]

Ratio = Union[float, Tuple[float, ...]]
#: the sharpness metrics ISA ranks query blocks by (``ISAConfig.sharpness``, calibration grids, profiles)
SHARPNESS_METRICS = ("topk_mass", "l2")
BACKENDS = ("auto", "reference", "triton")
#: the three ratios of ISA, in the order configs and profiles list them
RATIO_NAMES = ("alpha_s", "alpha_f", "alpha_ns")


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

    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list; give one value per head or a single number")
        return tuple(one(v, f"[{i}]") for i, v in enumerate(value))
    return one(value)


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

    Each ratio may be a sequence with one value per attention head.

    Raises:
        TypeError / ValueError: a ratio outside (0, 1], a bad block size, unknown metric or backend.

    Example:
        >>> cfg = ISAConfig(alpha_s=0.25, alpha_f=(0.5, 0.75))   # per-head alpha_f for 2 heads
        >>> ISAConfig.from_dict(cfg.to_dict()) == cfg
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
        # computed once so that traced code (torch.compile) only reads an attribute
        object.__setattr__(self, "_encoded", json.dumps(self.to_dict(), sort_keys=True))

    # -------------------------------------------------------------- helpers
    @property
    def is_dense(self) -> bool:
        """True when every ratio is 1, i.e. ISA computes exactly dense attention."""
        return all(v == 1.0 for name in RATIO_NAMES for v in _as_tuple(getattr(self, name)))

    @property
    def num_heads(self) -> int | None:
        """The head count implied by per-head ratios, or None when all ratios are scalars."""
        lens = {len(getattr(self, n)) for n in RATIO_NAMES if isinstance(getattr(self, n), tuple)}
        if len(lens) > 1:
            return -1
        return lens.pop() if lens else None

    def per_head(self, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """The three ratios as float64 tensors of shape [num_heads].

        Raises:
            ValueError: a per-head ratio whose length differs from ``num_heads``.
        """
        out = {}
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
        """Plain-Python dict (lists for per-head ratios), safe for YAML/JSON."""
        d = {}
        for f in fields(self):
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
