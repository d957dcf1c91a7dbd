"""The FlexAttention executor (:mod:`isa_plugin.kernels.flex`) for any mode's plan, on CUDA.

The call is padded and pooled once (:func:`~isa_plugin.kernels.flex.flex_prepare`); the config's mode plans
from those block means (with ``share_plan``, one plan from the batch means) and one FlexAttention call runs
the plan.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.flex import execute_flex, flex_ineligible, flex_prepare
from ..selection import plan_from_pooled
from ..execution import Executor, register_executor

__all__ = ["FlexExecutor", "flex_attention_call"]


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, config, scale: float,
                        return_plan: bool = False, plan_only: bool = False):
    """Plan with ``config``'s mode and run the plan through FlexAttention (eager on the CPU, for tests).

    Returns:
        [B, N, H, D] in q's dtype, or ``(out, plan)`` when ``return_plan``, or the plan alone when ``plan_only``.
    """
    layout.check(q.shape[1])
    blocks = layout.blocks(config.block_size).to(q.device)
    prepared = flex_prepare(q, k, v, blocks, config.pseudo_block_size, config.pseudo_keys)
    plan = plan_from_pooled(config.selection, prepared.qbar, prepared.kbar, blocks, config.settings, scale, config.share_plan)
    if plan_only:
        return plan
    out = execute_flex(q, k, v, plan, scale, prepared)
    return (out, plan) if return_plan else out


class FlexExecutor(Executor):
    """FlexAttention with a block mask built from the plan and a count-bias ``score_mod``."""

    name = "flex"

    def ineligible(self, q, config) -> Optional[str]:
        if not q.is_cuda:
            return "inputs are on cpu, the FlexAttention executor needs CUDA"
        return flex_ineligible(q, config.block_size)

    def run(self, q, k, v, layout, config, scale):
        return flex_attention_call(q, k, v, layout, config, scale)

    def plan(self, q, k, v, layout, config, scale):
        # planning reads q̄, k̄ only; v is padded with the inputs when given (k stands in when it is not)
        return flex_attention_call(q, k, k if v is None else v, layout, config, scale, plan_only=True)

    def execute(self, q, k, v, layout, config, scale, plan):
        return execute_flex(q, k, v, plan, scale)


register_executor(FlexExecutor())
