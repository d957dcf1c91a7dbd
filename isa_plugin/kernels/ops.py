"""``torch.library`` custom ops wrapping the ISA kernels, so ``torch.compile`` sees opaque nodes.

- ``isa_plugin::isa_attention(q, k, v, span_kinds, span_lens, alpha_s, alpha_f, alpha_ns, block_size,
  sharpness, topk_fraction, scale, exact_backend, share_plan=False) -> out``: plan and execute, q/k/v/out
  [B, N, H, D]; with ``share_plan`` one plan from the batch-mean block means serves every batch entry.
- ``isa_plugin::pool_blocks(x, starts, counts, block_size) -> [B, H, nb, D] float32``.

The layout travels as two int lists (span kinds 0 target / 1 context / 2 text, and span lengths), the
ratios as float lists (one value, or one per head).
"""

from __future__ import annotations

import math
from typing import List

import torch

from ..config import ISAConfig
from ..layout import Layout

__all__ = ["isa_attention_op", "pool_blocks_op", "isa_attention_kernels"]


@torch.library.custom_op("isa_plugin::pool_blocks", mutates_args=())
def pool_blocks_op(x: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, block_size: int) -> torch.Tensor:
    from .pooling import pool_blocks_triton

    return pool_blocks_triton(x, starts=starts, counts=counts, block_size=block_size)[0]


@pool_blocks_op.register_fake
def _(x, starts, counts, block_size):
    B, N, H, D = x.shape
    return x.new_empty((B, H, starts.shape[0], D), dtype=torch.float32)


@torch.library.custom_op("isa_plugin::isa_attention", mutates_args=())
def isa_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span_kinds: List[int],
    span_lens: List[int],
    alpha_s: List[float],
    alpha_f: List[float],
    alpha_ns: List[float],
    block_size: int,
    sharpness: str,
    topk_fraction: float,
    scale: float,
    exact_backend: str,
    share_plan: bool = False,
) -> torch.Tensor:
    from .executor import execute_compact
    from .plan import plan_compact

    layout = Layout.decode(span_kinds, span_lens)

    def r(x):
        return x[0] if len(x) == 1 else tuple(x)

    config = ISAConfig(
        alpha_s=r(alpha_s), alpha_f=r(alpha_f), alpha_ns=r(alpha_ns), block_size=block_size,
        sharpness=sharpness, topk_fraction=topk_fraction, backend="triton", share_plan=share_plan,
    )
    cp = plan_compact(q, k, layout, config, scale, v=v, _defer=True)
    return execute_compact(q, k, v, cp, scale, exact_backend=exact_backend)


@isa_attention_op.register_fake
def _(q, k, v, span_kinds, span_lens, alpha_s, alpha_f, alpha_ns, block_size, sharpness, topk_fraction, scale, exact_backend,
      share_plan=False):
    return torch.empty_like(q)


def isa_attention_kernels(q, k, v, layout: Layout, config: ISAConfig, scale=None, exact_backend: str = "auto"):
    """ISA through the custom op (plan + execute). q, k, v: [B, N, H, D]; returns [B, N, H, D]."""
    def lst(x):
        return [float(a) for a in x] if isinstance(x, tuple) else [float(x)]

    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return isa_attention_op(
        q, k, v,
        *layout.encode(),
        lst(config.alpha_s), lst(config.alpha_f), lst(config.alpha_ns),
        int(config.block_size), config.sharpness, float(config.topk_fraction), sc, exact_backend, bool(config.share_plan),
    )
