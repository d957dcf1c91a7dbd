"""``torch.library`` custom ops wrapping the ISA kernels, so ``torch.compile`` sees opaque nodes.

- ``isa_plugin::pool_blocks(x, starts, counts, block_size) -> [B, H, nb, D] float32``.
- ``isa_plugin::coarse_residual_add(out, rows, gate, block_size) -> ()``: ``out[t] += gate[t] · rows[t //
  block_size]`` in place (the gated coarse residual's last step, :mod:`~isa_plugin.kernels.coarse_triton`).

The whole-call op (``isa_plugin::isa_attention``) is the Triton executor's (:mod:`isa_plugin.executors.triton`).
"""

from __future__ import annotations


import torch

__all__ = ["pool_blocks_op", "coarse_residual_add_op"]

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
