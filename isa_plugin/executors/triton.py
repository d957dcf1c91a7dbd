"""The Triton executor: ISA's kernels (:mod:`isa_plugin.kernels.executor`) for plans with one pseudo-key per block.

It runs a :class:`~isa_plugin.kernels.compact.CompactPlan`: the full rows as one exact group (cuDNN on
gathered copies for fp16/bf16, Triton for fp32), every other row over its own list of exact KV' blocks
plus block-mean pseudo-keys in Triton. A mode with a GPU planner for this executor
(``SelectionMode.gpu_planners["triton"]``, e.g. the fixed mode's) builds the CompactPlan on the device
without host synchronisation; any other mode's plan is converted
(:func:`~isa_plugin.kernels.compact.compact_from_block_plan`).

The kernels serve CUDA inputs of dtype fp16, bf16 or fp32 with head_dim 64 or 128 and block sizes 16, 32,
64 or 128, on GPUs of compute capability 8.0 or newer (Ampere, Ada, Hopper). The whole call (pooling,
planning and both groups) is one custom op, ``isa_plugin::isa_attention``, opaque to ``torch.compile``.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ..config import ISAConfig
from ..kernels.compact import compact_from_block_plan
from ..kernels.executor import execute_compact
from ..kernels.reference import pool_blocks
from ..layout import Layout
from ..selection import plan_from_pooled
from ..execution import Executor, register_executor

__all__ = ["TritonExecutor", "triton_ineligible", "isa_attention_kernels", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EXACT_BACKENDS = ("auto", "sdpa", "triton")


def triton_ineligible(q: torch.Tensor, config: ISAConfig) -> Optional[str]:
    """Why the Triton kernels cannot serve a call with these inputs (None when they can).

    Args:
        q: [B, N, H, D] query tensor (device, dtype, head_dim and strides are checked).
        config: :class:`~isa_plugin.ISAConfig` (its block size and pseudo-key size are checked).

    Returns:
        A sentence naming the unsupported value and what is supported, or None.

    Example:
        >>> triton_ineligible(torch.zeros(1, 128, 2, 64), ISAConfig())
        'inputs are on cpu, the kernels need CUDA'
    """
    if not q.is_cuda:
        return f"inputs are on {q.device.type}, the kernels need CUDA"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported; supported: float16, bfloat16, float32"
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={D} is not supported; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
    if config.block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size={config.block_size} is not supported by the kernels; supported: {SUPPORTED_BLOCK_SIZES}"
    if config.pseudo_block_size != config.block_size:
        return (f"pseudo_block={config.pseudo_block_size} is not supported by the kernels (one pseudo-key per block, "
                f"pseudo_block={config.block_size}); the FlexAttention executor takes sub-block pseudo-keys")
    if q.stride(-1) != 1:
        return "q needs a unit stride on the head dimension"
    major, _ = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"compute capability {major}.x is too old; the kernels need 8.0 or newer (Ampere, Ada, Hopper)"
    try:
        import triton  # noqa: F401  (availability check)
    except Exception as e:  # pragma: no cover - environment
        return f"triton is not importable ({e})"
    return None


@functools.lru_cache(maxsize=64)
def _decode(kinds: Tuple[int, ...], lens: Tuple[int, ...], config_json: str) -> Tuple[Layout, ISAConfig]:
    """The op's layout and config arguments as objects (cached: a pipeline repeats a few of them)."""
    return Layout.decode(kinds, lens), ISAConfig.decode(config_json)


def compact_plan(q, k, v, layout: Layout, config: ISAConfig, scale: float, defer_selections: bool = True):
    """The :class:`~isa_plugin.kernels.compact.CompactPlan` of a call: the mode's GPU planner for this executor
    when it has one (selections deferred to the kernels unless ``defer_selections`` is False: a plan kept for
    later steps must hold its selections), else the mode's plan converted."""
    planner = config.selection.gpu_planners.get(TritonExecutor.name)
    if planner is not None:
        return planner(q, k, layout, config, scale, v=v, defer_selections=defer_selections)
    blocks = layout.blocks(config.block_size).to(q.device)
    plan = plan_from_pooled(config.selection, pool_blocks(q, blocks), pool_blocks(k, blocks), blocks, config.settings, scale,
                            config.share_plan)
    return compact_from_block_plan(plan)


@torch.library.custom_op("isa_plugin::isa_attention", mutates_args=())
def isa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span_kinds: List[int], span_lens: List[int],
                     config_json: str, scale: float, exact_backend: str) -> torch.Tensor:
    layout, config = _decode(tuple(span_kinds), tuple(span_lens), config_json)
    cp = compact_plan(q, k, v, layout, config, scale)
    return execute_compact(q, k, v, cp, scale, exact_backend=exact_backend)


@isa_attention_op.register_fake
def _(q, k, v, span_kinds, span_lens, config_json, scale, exact_backend):
    return torch.empty_like(q)


def isa_attention_kernels(q, k, v, layout: Layout, config: ISAConfig, scale: Optional[float] = None, exact_backend: str = "auto"):
    """ISA attention through the Triton kernels (pooling, planning and both groups in one custom op).

    The caller decides eligibility first (:func:`triton_ineligible`). fp16/bf16 inputs run the exact group
    through cuDNN on gathered copies (``exact_backend="auto"``), fp32 inputs stay in fp32 (Triton for both).

    Args:
        q, k, v: [B, N, H, D] tensors of one dtype, q with a unit stride on D (k and v are made contiguous
            when they lack one).
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
    k, v = _unit_stride(k), _unit_stride(v)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return isa_attention_op(q, k, v, *layout.encode(), config.encode(), sc, exact_backend)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonExecutor(Executor):
    """ISA's Triton kernels (see the module docstring)."""

    name = "triton"

    def ineligible(self, q, config):
        return triton_ineligible(q, config)

    def run(self, q, k, v, layout, config, scale):
        return isa_attention_kernels(q, k, v, layout, config, scale=scale)

    def plan(self, q, k, v, layout, config, scale):
        # selections only (no pooled k̄, v̄): execute pools the k, v it runs on, so the plan serves later steps
        return compact_plan(q, k, None, layout, config, scale, defer_selections=False)

    def execute(self, q, k, v, layout, config, scale, plan):
        return execute_compact(q, _unit_stride(k), _unit_stride(v), plan, scale)


register_executor(TritonExecutor())
