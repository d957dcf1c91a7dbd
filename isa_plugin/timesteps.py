"""Timesteps of attention calls: one scalar per call, and the buckets of timestep-bucketed profiles.

A transformer call's timestep may be a number, a [B] tensor (one per batch entry, e.g. the two branches of
classifier-free guidance) or a [B, S] tensor of per-token timesteps (clean context tokens at 0, noisy
target tokens at t). Calibration and inference both reduce it with :func:`timestep_scalar` — the largest
value in the whole tensor — and pick the bucket with :func:`bucket_index`, so a call measured in bucket
``b`` during calibration is served with bucket ``b``'s settings at inference.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Tuple

import torch

__all__ = ["timestep_scalar", "bucket_edges", "bucket_index"]


def timestep_scalar(ts: Any) -> Optional[float]:
    """The timestep of one call: the maximum over the whole tensor (every batch entry and token).

    Args:
        ts: None, a number, or a tensor of any shape: [] , [B], or [B, S] per-token timesteps. Lists and
            arrays are read as tensors.

    Returns:
        ``float``, or None when ``ts`` is None or empty (the call has no timestep).

    Raises:
        TypeError: ``ts`` is a bool, a string, or something that is not numbers.

    Example:
        >>> timestep_scalar(torch.tensor([[0.0, 0.0, 700.0], [0.0, 0.0, 700.0]]))  # per-token, CFG batch
        700.0
        >>> timestep_scalar(500), timestep_scalar(None)
        (500.0, None)
    """
    if ts is None:
        return None
    if isinstance(ts, numbers.Real) and not isinstance(ts, bool):
        return float(ts)
    if not isinstance(ts, torch.Tensor):
        if isinstance(ts, (bool, str, bytes)):
            raise TypeError(f"timestep={ts!r} must be a number or a tensor of numbers")
        try:
            ts = torch.as_tensor(ts)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"timestep of type {type(ts).__name__} must be a number or a tensor of numbers") from None
    if ts.dtype == torch.bool or ts.is_complex():
        raise TypeError(f"timestep tensor of dtype {ts.dtype} must hold real numbers")
    if ts.numel() == 0:
        return None
    return float(ts.detach().max())


def bucket_edges(timesteps: Sequence[float], buckets: int) -> Tuple[float, ...]:
    """Edges that split the distinct ``timesteps`` into ``buckets`` groups of (near) equal size.

    Each edge lies midway between the largest timestep of one group and the smallest of the next.

    Args:
        timesteps: the timesteps calibration measures (any order, repeats allowed).
        buckets: wanted number of buckets; fewer when there are fewer distinct timesteps.

    Returns:
        Strictly ascending edges (``len = buckets - 1``); ``()`` for a single bucket.

    Raises:
        ValueError: ``buckets`` is not a positive integer.

    Example:
        >>> bucket_edges([999.0, 750.0, 500.0, 250.0], 2)
        (625.0,)
    """
    if isinstance(buckets, bool) or not isinstance(buckets, numbers.Integral) or buckets < 1:
        raise ValueError(f"buckets={buckets!r} must be a positive integer (1 = one bucket for every timestep)")
    vals = sorted({float(t) for t in timesteps})
    buckets = min(int(buckets), len(vals))
    if buckets <= 1:
        return ()
    groups = [vals[round(i * len(vals) / buckets): round((i + 1) * len(vals) / buckets)] for i in range(buckets)]
    return tuple((g[-1] + h[0]) / 2 for g, h in zip(groups, groups[1:]))


def bucket_index(t: Any, edges: Sequence[float]) -> int:
    """The bucket of timestep ``t``: bucket ``b`` holds ``edges[b-1] <= t < edges[b]``.

    Args:
        t: anything :func:`timestep_scalar` takes (a number, a [B] or [B, S] tensor, None).
        edges: ascending bucket edges (``()``: one bucket).

    Returns:
        An index in ``[0, len(edges)]``; always 0 when there are no edges.

    Raises:
        ValueError: there are several buckets but the call has no timestep.

    Example:
        >>> bucket_index(torch.tensor([[0.0, 900.0]]), (500.0,)), bucket_index(100, (500.0,))
        (1, 0)
    """
    if not edges:
        return 0
    value = timestep_scalar(t)
    if value is None:
        raise ValueError(
            f"the settings have {len(edges) + 1} timestep buckets (edges {list(edges)}); pass the call's timestep "
            "to pick one"
        )
    return sum(1 for edge in edges if value >= edge)  # edges ascend; plain Python so torch.compile traces it
