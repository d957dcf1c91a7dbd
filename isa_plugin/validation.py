"""Validation of the numbers ISA settings are made of: ratios, counts, budgets, per-head values.

Every setting, grid, profile and command checks its values through these functions, so that one bad
value gets one message everywhere (naming the value and the fix).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Tuple, Union

import torch

__all__ = ["Ratio", "Count", "validate_ratio", "validate_count", "validate_budget", "per_head_tensor", "as_tuple"]

Ratio = Union[float, Tuple[float, ...]]
Count = Union[int, Tuple[int, ...]]


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


def validate_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (the allowed names of an option).

    Raises:
        ValueError: any other value, naming it and the allowed ones.

    Example:
        >>> validate_choice("attention", "sparse", ("auto", "isa", "dense"))
        Traceback (most recent call last):
        ValueError: attention='sparse' is not supported; supported: 'auto', 'isa', 'dense'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; supported: {', '.join(map(repr, choices))}")
    return value


def validate_count(name: str, value: Any, low: int) -> Count:
    """Check a count setting: an integer >= ``low``, or one per head (tuple).

    Raises:
        TypeError: not an integer (bools included). ValueError: below ``low``, or an empty sequence.
    """

    def one(v, where=""):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}{where}={v!r} must be an integer >= {low}")
        if int(v) < low:
            raise ValueError(f"{name}{where}={int(v)} must be >= {low}")
        return int(v)

    return _per_head(name, value, one)


def per_head_tensor(value, num_heads: int, name: str, dtype, device) -> torch.Tensor:
    """A setting as a [num_heads] tensor: a per-head tuple as it is, a scalar repeated.

    Raises:
        ValueError: a tuple whose length is not ``num_heads``.
    """
    if isinstance(value, tuple):
        if len(value) != num_heads:
            raise ValueError(f"{name} has {len(value)} per-head values but the attention call has {num_heads} heads; "
                             f"give {num_heads} values or a single number")
        return torch.tensor(value, dtype=dtype, device=device)
    return torch.full((num_heads,), value, dtype=dtype, device=device)




def as_tuple(v) -> Tuple:
    """A per-head tuple as it is, a scalar as a 1-tuple."""
    return v if isinstance(v, tuple) else (v,)
