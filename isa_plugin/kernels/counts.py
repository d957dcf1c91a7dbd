"""The count rule of ISA: how many blocks a ratio keeps.

Every selection of ISA (context blocks kept by α_s, exact query blocks by α_f, exactly computed key blocks
by α_ns) keeps ``ceil(alpha * n)`` of ``n`` candidates, at least one when there is any and never more
than ``n`` (:func:`keep_count`); the ``"topk_mass"`` sharpness sums the top ``max(1, floor(f * n))``
target blocks (:func:`topk_count`). The planners, the calibration statistics and the cost model all
count through these two functions, so they agree to the block.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

__all__ = ["keep_count", "topk_count"]

# ratios such as 0.1 are not exact in binary: 0.1 * 30 is 3.0000000000000004, whose ceil would be 4
_ROUND_OFF = 1e-9

Number = Union[int, float]


def keep_count(alpha: Union[Number, torch.Tensor], n: Union[Number, torch.Tensor]) -> Union[int, torch.Tensor]:
    """Blocks kept by ratio ``alpha`` out of ``n``: ``ceil(alpha * n)`` clamped to ``[min(1, n), n]``.

    Robust to float round-off (``keep_count(0.1, 30) == 3``). Python numbers give an ``int``; when either
    argument is a tensor the rule applies elementwise (broadcasting) in float64 and returns int64.

    Args:
        alpha: ratio in (0, 1]: a number or a tensor (e.g. per head [H]).
        n: candidate count: an int or an integer tensor broadcastable with ``alpha`` (e.g. [B, H]).

    Returns:
        ``int`` for numbers; an int64 tensor of the broadcast shape otherwise (0 where ``n <= 0``).

    Raises:
        Nothing of its own; ratios are validated where configs are built (:func:`isa_plugin.config.validate_ratio`).

    Example:
        >>> keep_count(0.125, 20), keep_count(0.01, 5), keep_count(0.5, 0)
        (3, 1, 0)
        >>> keep_count(torch.tensor([0.1, 1.0], dtype=torch.float64), 30).tolist()
        [3, 30]
    """
    if isinstance(n, numbers.Number) and isinstance(alpha, torch.Tensor):
        # a host count: no tensor is made from it (no host-to-device copy: a CUDA graph can capture this)
        m = max(float(n), 0.0)
        c = torch.ceil(alpha.to(torch.float64) * m - _ROUND_OFF)
        return c.clamp(min=1.0, max=m).to(torch.int64) if m > 0 else torch.zeros_like(c, dtype=torch.int64)
    if isinstance(alpha, torch.Tensor) or isinstance(n, torch.Tensor):
        device = alpha.device if isinstance(alpha, torch.Tensor) else n.device
        a = torch.as_tensor(alpha, dtype=torch.float64, device=device)
        m = torch.as_tensor(n, device=device).to(torch.float64).clamp(min=0.0)
        c = torch.ceil(a * m - _ROUND_OFF)
        return torch.minimum(c.clamp(min=1.0), m).to(torch.int64)
    n = int(n)
    if n <= 0:
        return 0
    return int(min(max(math.ceil(float(alpha) * n - _ROUND_OFF), 1), n))


def topk_count(fraction: float, n: int) -> int:
    """The k of the ``"topk_mass"`` sharpness metric: ``max(1, floor(fraction * n))`` of ``n`` target blocks.

    Args:
        fraction: ``ISAConfig.topk_fraction``, in (0, 1].
        n: number of target key blocks.

    Returns:
        ``int`` >= 1 (callers take ``min(k, n)`` where ``n`` may be 0).

    Example:
        >>> topk_count(0.0625, 40), topk_count(0.0625, 3)
        (2, 1)
    """
    return max(1, int(math.floor(float(fraction) * int(n) + _ROUND_OFF)))
