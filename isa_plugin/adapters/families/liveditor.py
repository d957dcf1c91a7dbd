"""LIVEditor family (:class:`~isa_plugin.pipelines.LIVEditorTransformer3DModel`): ISA + the trained gate on ``blocks.N.attn1``.

Layers: the self-attention ``blocks.N.attn1`` of every block (the model's own processor is
``LIVEditorAttnProcessor``: dense attention + gated coarse residual); cross-attention ``attn2`` keeps
diffusers' ``WanAttnProcessor``.

Processor: :class:`LIVEditorISAAttnProcessor` is the Wan ISA processor plus the model's gate
(:func:`~isa_plugin.pipelines.wan_attention.liveditor_gate`): every call, ISA or dense fallback, returns
``attention + gate · coarse`` (``isa_attention(..., residual_gate=gate)``), so ISA replaces only the
attention the model was trained with ISA in the loop.

Layout: the token sequence is ``[target; source]`` (noisy target tokens, then the clean source's), read
from each call's ``hidden_states`` and ``source_latents`` shapes: ``Layout([("target", n_t), ("context",
n_s)])``. Blocks are per span (the package's rule). The authors' own ISA cuts the whole sequence into
64-token blocks, which differs only when ``n_t`` is not a multiple of the block size (one block then
straddles target and source; at 480p, 32,760 = 511.875 x 64); ``LIVEditorLayout(blocking="sequence")``
reproduces that blocking exactly (the straddling block counted as target) for comparison —
``benchmarks/bench_liveditor.py`` measures how much the two differ.

Context parallelism (Ulysses): the model builds ``[target; source]`` and its RoPE inside its forward, so it
has no ``_cp_plan``; :func:`liveditor_cp_plan` gives one for ``enable_parallelism(config=..., cp_plan=...)``.
With ISA applied, each ``attn1`` exchanges its shard for the whole sequence of its heads and adds the gated
residual there (:mod:`isa_plugin.adapters.parallel`): the output equals single-process ISA + gate. The
model's own processor is not context-parallel and raises under such a plan.

Calibration is optional for this model: it was fine-tuned with ISA's fixed ratios in the loop, so the
default :class:`~isa_plugin.ISAConfig` is what it was trained with; ``isa calibrate`` still works.
:func:`authors_isa` gives the settings the authors run it with (the fixed ratios on their whole-sequence
blocking); :class:`~isa_plugin.pipelines.LIVEditorPipeline` runs them by default.

Example:
    >>> pipe = LIVEditorPipeline.from_pretrained("liveditor-14b", torch_dtype=torch.bfloat16).to("cuda")
    >>> apply_isa(pipe, ISAConfig())                          # the ratios, per-span blocking
    >>> config, layout = authors_isa(); apply_isa(pipe, config, layout=layout)   # the authors' settings
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch

from ...config import ISAConfig
from ...layout import Layout
from ...validation import validate_choice
from ...pipelines.wan_attention import liveditor_gate
from ..context import LayoutProvider
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from .wan import WanISAAttnProcessor

__all__ = ["LIVEditorISAAttnProcessor", "LIVEditorLayout", "LIVEditorAdapter", "liveditor_layout", "liveditor_cp_plan",
           "authors_isa"]

_BLOCKINGS = ("span", "sequence")


def liveditor_layout(n_target: int, n_source: int, block_size: int = 64, *, blocking: str = "span") -> Layout:
    """The ISA layout of a LIVEditor call: target tokens, then source (context) tokens.

    Args:
        n_target, n_source: token counts (> 0).
        block_size: ISA block size (used by ``blocking="sequence"`` only).
        blocking: ``"span"`` (default: blocks restart at the source, the package's rule) or ``"sequence"``
            (the authors' whole-sequence blocks: the target span is rounded up to a multiple of
            ``block_size``, so the straddling block counts as target and every block boundary is a
            multiple of ``block_size`` from token 0).

    Returns:
        a :class:`Layout` of ``n_target + n_source`` tokens.

    Raises:
        ValueError: a non-positive count or block size, or an unknown ``blocking``.

    Example:
        >>> liveditor_layout(32760, 32760, 64, blocking="sequence")   # target 32,768, context 32,752
    """
    validate_choice("blocking", blocking, _BLOCKINGS)
    if min(n_target, n_source) <= 0 or block_size <= 0:
        raise ValueError(f"token counts and block size must be positive, got {n_target}, {n_source}, {block_size}")
    if blocking == "sequence":
        shift = min(-n_target % block_size, n_source - 1)
        n_target, n_source = n_target + shift, n_source - shift
    return Layout([("target", n_target), ("context", n_source)])


def _counts(transformer, arguments: Mapping[str, Any]):
    x, src = arguments.get("hidden_states"), arguments.get("source_latents")
    if not (isinstance(x, torch.Tensor) and isinstance(src, torch.Tensor) and x.ndim == 5 and src.ndim == 5):
        return None
    return transformer.token_counts(x, src)


def liveditor_cp_plan(transformer) -> dict:
    """A ``cp_plan`` for ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P), cp_plan=...)``.

    Splits the tokens at ``blocks.0`` and the RoPE at every ``blocks.N.attn1`` along the sequence, and
    gathers after the last block (before the target tokens are cut off). Only ISA's processors run under it
    (apply ISA before the first call); the sequence length must divide by P.

    Args:
        transformer: a ``LIVEditorTransformer3DModel`` (its ``blocks`` are counted).

    Returns:
        the plan (a dict of diffusers ``ContextParallelInput`` / ``ContextParallelOutput``).

    Raises:
        ValueError: a model with fewer than two blocks.

    Example:
        >>> apply_isa(pipe, ISAConfig())
        >>> pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4),
        ...                                     cp_plan=liveditor_cp_plan(pipe.transformer))
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    n = len(transformer.blocks)
    if n < 2:
        raise ValueError(f"liveditor_cp_plan needs two or more blocks (blocks.0 splits, the last one gathers); got {n}")
    rope = [ContextParallelInput(split_dim=1, expected_dims=4, split_output=False)] * 2
    plan = {"blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)}}
    plan.update({f"blocks.{i}.attn1": {"rotary_emb": rope} for i in range(n)})
    plan[f"blocks.{n - 1}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


class LIVEditorLayout(LayoutProvider):
    """Layout provider for LIVEditor calls, with a choice of blocking (see :func:`liveditor_layout`).

    The family infers the per-span layout by itself; pass this to ``apply_isa(..., layout=...)`` only to
    choose ``blocking="sequence"``.

    Args:
        blocking: ``"span"`` or ``"sequence"``.
        block_size: the ISA block size the layout is made for (default 64, ``ISAConfig``'s default).

    Example:
        >>> apply_isa(pipe, ISAConfig(), layout=LIVEditorLayout(blocking="sequence"))
    """

    def __init__(self, blocking: str = "span", block_size: int = 64):
        liveditor_layout(1, 1, block_size, blocking=blocking)  # validates
        self.blocking, self.block_size = blocking, block_size

    def __repr__(self) -> str:
        return f"LIVEditorLayout(blocking={self.blocking!r}, block_size={self.block_size})"

    def __call__(self, transformer, arguments: Mapping[str, Any]) -> Optional[Layout]:
        counts = _counts(transformer, arguments)
        return None if counts is None else liveditor_layout(*counts, self.block_size, blocking=self.blocking)


def authors_isa() -> Tuple[ISAConfig, "LIVEditorLayout"]:
    """The ISA LIVEditor-14B was fine-tuned with and its authors' inference runs: ``(config, layout)``.

    The fixed mode with α_s = 1/8 (context key blocks kept), α_f = 1/2 (query blocks, target and source,
    computed exactly; ranked by the top-k mass over target key blocks, k = max(1, ⌊n_target_blocks / 16⌋)),
    α_ns = 1/16 (KV' blocks each other query block computes exactly), 64-token blocks, on the authors'
    whole-sequence blocking (``LIVEditorLayout(blocking="sequence")``). The model's trained gate adds its
    coarse residual on every call (:class:`LIVEditorISAAttnProcessor`).

    Returns:
        ``(ISAConfig, LIVEditorLayout)`` for ``apply_isa(pipe, config, layout=layout)``.

    Example:
        >>> config, layout = authors_isa()
        >>> apply_isa(pipe, config, layout=layout)
    """
    block_size = 64
    config = ISAConfig(alpha_s=1 / 8, alpha_f=1 / 2, alpha_ns=1 / 16, sharpness="topk_mass", topk_fraction=1 / 16,
                       block_size=block_size)
    return config, LIVEditorLayout(blocking="sequence", block_size=block_size)


class LIVEditorISAAttnProcessor(WanISAAttnProcessor):
    """ISA for LIVEditor's self-attention: the Wan ISA processor plus the model's gated coarse residual.

    Replaces ``LIVEditorAttnProcessor`` on ``blocks.N.attn1``. Dense fallbacks keep the residual too.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.

    Example:
        >>> apply_isa(transformer, ISAConfig())   # installs this processor on every attn1
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        # the residual's block size is the model's (its own processor's), 64 for the released model
        self.residual_block_size = getattr(self.original, "block_size", self.residual_block_size)

    def residual_gate(self, attn, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return liveditor_gate(attn, hidden_states)


class LIVEditorAdapter(FamilyAdapter):
    """LIVEditor: ``blocks.N.attn1`` get :class:`LIVEditorISAAttnProcessor`; layout ``[target; source]`` per call."""

    name = "liveditor"
    transformer_classes = ("LIVEditorTransformer3DModel",)
    stock_processor_names = ("LIVEditorAttnProcessor",)
    layer_paths = (("blocks", "attn1"),)
    processor_class = LIVEditorISAAttnProcessor

    def layout_for_call(self, transformer, arguments):
        counts = _counts(transformer, arguments)
        return None if counts is None else liveditor_layout(*counts)


register_family(LIVEditorAdapter())
register_pipeline(PipelineAdapter("liveditor", ("LIVEditorPipeline",)))
