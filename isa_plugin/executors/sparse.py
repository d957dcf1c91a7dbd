"""The block-sparse executor (:mod:`isa_plugin.kernels.sparse_attn`): any mode's plan, walked as CSR lists.

Per query block one Triton program walks the row's exact key blocks and then the pseudo-key tail (the
pseudo-key slots of every other kept block, count-biased), in one online softmax. The config's mode plans
from block means pooled on the device (with ``share_plan``, one plan from the batch means); finer pseudo-keys
(sub-block means or k-means slots) are computed per block before the attention kernel.
"""

from __future__ import annotations

from typing import Optional

from ..kernels.pooling import pool_blocks_triton
from ..kernels.sparse_attn import block_meta, execute_block_plan, sparse_ineligible_for
from ..selection import plan_from_pooled
from ..execution import Executor, register_executor

__all__ = ["SparseExecutor"]


def sparse_plan(q, k, layout, config, scale: float):
    """The plan of ``config``'s mode for q, k [B, N, H, D] from block means pooled by the Triton kernel."""
    blocks = layout.blocks(config.block_size).to(q.device)
    starts, counts, _ = block_meta(blocks, str(q.device))  # cached on the device: no copy, no synchronisation
    if q.stride() == k.stride():
        qbar, kbar = pool_blocks_triton(q, k, starts=starts, counts=counts, block_size=config.block_size)
    else:
        (qbar,) = pool_blocks_triton(q, starts=starts, counts=counts, block_size=config.block_size)
        (kbar,) = pool_blocks_triton(k, starts=starts, counts=counts, block_size=config.block_size)
    return plan_from_pooled(config.selection, qbar, kbar, blocks, config.settings, scale, config.share_plan)


class SparseExecutor(Executor):
    """The Triton block-sparse executor (see the module docstring)."""

    name = "sparse"

    def ineligible(self, q, config) -> Optional[str]:
        if not q.is_cuda:
            return f"inputs are on {q.device.type}, the block-sparse executor needs CUDA"
        return sparse_ineligible_for(q, config.block_size)

    def plan(self, q, k, v, layout, config, scale):
        return sparse_plan(q, k, layout, config, scale)

    def execute(self, q, k, v, layout, config, scale, plan):
        return execute_block_plan(q, k, v, plan, scale)


register_executor(SparseExecutor())
