"""``torch.library`` custom ops wrapping the ISA kernels, so ``torch.compile`` sees opaque nodes.

- ``isa_plugin::isa_attention(q, k, v, span_kinds, span_lens, config_json, scale, exact_backend) -> out``:
  plan and execute, q/k/v/out [B, N, H, D]. The layout travels as :meth:`Layout.encode`'s two int lists,
  the config as :meth:`ISAConfig.encode`'s JSON string (the same encoding as the reference op
  ``isa_plugin::isa_attention_reference``); ``exact_backend`` is the kernels' own choice for the exact
  group (see :func:`~isa_plugin.kernels.executor.execute_compact`).
- ``isa_plugin::pool_blocks(x, starts, counts, block_size) -> [B, H, nb, D] float32``.
- ``isa_plugin::coarse_residual_add(out, rows, gate, block_size) -> ()``: ``out[t] += gate[t] · rows[t //
  block_size]`` in place (the gated coarse residual's last step, :mod:`~isa_plugin.kernels.coarse_triton`).

:func:`isa_attention_kernels` is the one entry point callers use.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ..config import ISAConfig
from ..layout import Layout

__all__ = ["isa_attention_op", "pool_blocks_op", "coarse_residual_add_op", "isa_attention_kernels"]

_EXACT_BACKENDS = ("auto", "sdpa", "triton")


@torch.library.custom_op("isa_plugin::pool_blocks", mutates_args=())
def pool_blocks_op(x: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, block_size: int) -> torch.Tensor:
    from .pooling import pool_blocks_triton

    return pool_blocks_triton(x, starts=starts, counts=counts, block_size=block_size)[0]


@pool_blocks_op.register_fake
def _(x, starts, counts, block_size):
    B, N, H, D = x.shape
    return x.new_empty((B, H, starts.shape[0], D), dtype=torch.float32)


@torch.library.custom_op("isa_plugin::coarse_residual_add", mutates_args=("out",))
def coarse_residual_add_op(out: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, block_size: int) -> None:
    from .coarse_triton import coarse_residual_add_triton

    coarse_residual_add_triton(out, rows, gate, block_size)


@coarse_residual_add_op.register_fake
def _(out, rows, gate, block_size):
    return None


@functools.lru_cache(maxsize=64)
def _decode(kinds: Tuple[int, ...], lens: Tuple[int, ...], config_json: str) -> Tuple[Layout, ISAConfig]:
    """The op's layout and config arguments as objects (cached: a pipeline repeats a few of them)."""
    return Layout.decode(kinds, lens), ISAConfig.decode(config_json)


@torch.library.custom_op("isa_plugin::isa_attention", mutates_args=())
def isa_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span_kinds: List[int],
    span_lens: List[int],
    config_json: str,
    scale: float,
    exact_backend: str,
) -> torch.Tensor:
    from .executor import execute_compact
    from .plan import plan_compact

    layout, config = _decode(tuple(span_kinds), tuple(span_lens), config_json)
    cp = plan_compact(q, k, layout, config, scale, v=v, defer_selections=True)
    return execute_compact(q, k, v, cp, scale, exact_backend=exact_backend)


@isa_attention_op.register_fake
def _(q, k, v, span_kinds, span_lens, config_json, scale, exact_backend):
    return torch.empty_like(q)


def isa_attention_kernels(q, k, v, layout: Layout, config: ISAConfig, scale: Optional[float] = None, exact_backend: str = "auto"):
    """ISA attention through the Triton kernels (pooling, planning and both groups in one custom op).

    The caller decides eligibility first (:func:`~isa_plugin.kernels.dispatch.triton_ineligible`).
    fp16/bf16 inputs run the exact group through cuDNN on gathered copies (``exact_backend="auto"``),
    fp32 inputs stay in fp32 (Triton for both groups).

    Args:
        q, k, v: [B, N, H, D] CUDA tensors of one dtype, q with a unit stride on D (k and v are made
            contiguous when they lack one).
        layout: :class:`~isa_plugin.Layout` covering N; config: :class:`~isa_plugin.ISAConfig`.
        scale: softmax scale (default 1/sqrt(D)).
        exact_backend: ``"auto"``, ``"sdpa"`` or ``"triton"`` for the exact group.

    Returns:
        [B, N, H, D] in q's dtype.

    Raises:
        ValueError: an unknown ``exact_backend``.

    Example:
        >>> out = isa_attention_kernels(q, k, v, Layout([("target", 4096), ("context", 4096)]), ISAConfig())  # doctest: +SKIP
    """
    if exact_backend not in _EXACT_BACKENDS:
        raise ValueError(f"exact_backend={exact_backend!r}; supported: {', '.join(map(repr, _EXACT_BACKENDS))}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return isa_attention_op(q, k, v, *layout.encode(), config.encode(), sc, exact_backend)
