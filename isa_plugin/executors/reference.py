"""The reference executor: any mode's plan run by the pure-PyTorch specification (any device, exact math).

:func:`isa_attention_reference` plans a call with the config's mode and runs
:func:`~isa_plugin.kernels.reference.execute_plan_reference`; :func:`plan_reference` is its planning half.
Inside a model the reference runs as one opaque custom op (``isa_plugin::isa_attention_reference``), so
``torch.compile`` neither traces nor breaks on it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from ..config import ISAConfig
from ..kernels.reference import execute_plan_reference, pool_blocks
from ..layout import Layout
from ..plan import BlockPlan
from ..selection import plan_from_pooled
from ..execution import Executor, register_executor

__all__ = ["ReferenceExecutor", "plan_reference", "isa_attention_reference"]


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def plan_reference(q: torch.Tensor, k: torch.Tensor, layout: Layout, config: ISAConfig, scale: Optional[float] = None) -> BlockPlan:
    """The plan of ``config``'s mode for q, k [B, N, H, D]: block means (float32; float64 for float64 inputs),
    then :meth:`SelectionMode.plan <isa_plugin.selection.SelectionMode.plan>` (with ``share_plan``, one plan
    from the batch means for every entry).

    Raises:
        ValueError: a layout that does not cover N tokens, per-head settings of the wrong length.

    Example:
        >>> q = k = torch.randn(1, 256, 2, 16)
        >>> plan = plan_reference(q, k, Layout([("target", 128), ("context", 128)]), ISAConfig(block_size=32))
        >>> plan.pair_counts()[0] > 0
        True
    """
    layout.check(q.shape[1])
    blocks = layout.blocks(config.block_size).to(q.device)
    return plan_from_pooled(config.selection, pool_blocks(q, blocks), pool_blocks(k, blocks), blocks, config.settings,
                            _scale(q, scale), config.share_plan)


def isa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    config: Optional[ISAConfig] = None,
    return_plan: bool = False,
    *,
    plan: Optional[BlockPlan] = None,
    scale: Optional[float] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, BlockPlan]]:
    """ISA attention computed with plain PyTorch ops (exact semantics, no speed), for any selection mode.

    Args:
        q, k, v: [B, N, H, D] (diffusers' layout), same shape and dtype.
        layout: the typed spans of the N tokens.
        config: the mode, its settings and the block size (default :class:`ISAConfig`).
        return_plan: also return the :class:`~isa_plugin.plan.BlockPlan`.
        plan: execute this plan instead of computing one (for testing executors on the same plan).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, N, H, D] in q's dtype, or ``(out, plan)`` when ``return_plan``.

    Raises:
        ValueError: shapes that differ, or a layout that does not cover N tokens.

    Example:
        >>> q = k = v = torch.randn(1, 200, 2, 16)
        >>> out = isa_attention_reference(q, k, v, Layout([("target", 100), ("context", 100)]))
    """
    config = config or ISAConfig()
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, N, H, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    layout.check(q.shape[1])
    if plan is None:
        plan = plan_reference(q, k, layout, config, scale)
    out = execute_plan_reference(q, k, v, plan, scale)
    return (out, plan) if return_plan else out


@torch.library.custom_op("isa_plugin::isa_attention_reference", mutates_args=())
def _reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span_kinds: List[int], span_lens: List[int],
                  config_json: str, scale: float) -> torch.Tensor:
    """The reference as one opaque op, so ``torch.compile`` does not trace (or break on) it."""
    layout = Layout.decode(span_kinds, span_lens)
    return isa_attention_reference(q, k, v, layout, ISAConfig.decode(config_json), scale=scale).contiguous()


@_reference_op.register_fake
def _(q, k, v, span_kinds, span_lens, config_json, scale):
    return q.new_empty(q.shape)


class ReferenceExecutor(Executor):
    """The PyTorch reference: serves every call on every device."""

    name = "reference"

    def ineligible(self, q, config):
        return None

    def run(self, q, k, v, layout, config, scale):
        kinds, lens = layout.encode()
        return _reference_op(q, k, v, kinds, lens, config.encode(), scale)

    def plan(self, q, k, v, layout, config, scale):
        return plan_reference(q, k, layout, config, scale)

    def execute(self, q, k, v, layout, config, scale, plan):
        return execute_plan_reference(q, k, v, plan, scale)


register_executor(ReferenceExecutor())
