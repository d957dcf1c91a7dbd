"""Wan family (``WanTransformer3DModel``: Wan2.1, Wan2.2): ISA on ``blocks.N.attn1`` only.

Layers: the video self-attention ``blocks.N.attn1`` of every block. Cross-attention ``attn2`` (text, and
the CLIP image branch of I2V models) keeps its stock processor.

Layout: Wan's transformer has no notion of context; in-context editing models (ICVE, EditVerse-style
fine-tunes; not LIVEditor, see :mod:`.liveditor`) concatenate the source video's latents to the noisy latents
along the frame axis. :class:`WanICLLayout` turns "``n`` context latent frames, after (or before) the
target frames" into the token layout of each call, from the 5-D ``hidden_states`` the transformer gets
(tokens per latent frame = (H/p_h)·(W/p_w)). Three ways to give ``n``:

- ``apply_isa(..., layout=WanICLLayout(context_frames=n, position="after"))``;
- per call, through the transformer's ``attention_kwargs``: ``{"isa_context_frames": n,
  "isa_context_position": "after"}`` (diffusers' Wan pipelines forward ``attention_kwargs`` to the
  transformer, which ignores keys other than the LoRA ``scale``), e.g. ``pipe(..., attention_kwargs=...)``;
- :class:`~isa_plugin.pipelines.WanInContextEditPipeline` does the latter itself for every call.

Without any of these, calls run dense with the fallback reason ``"layout unknown"``.

Example:
    >>> apply_isa(pipe.transformer, ISAConfig(), layout=WanICLLayout(context_frames=21))
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional

import torch

from ...layout import Layout
from ...pipelines.wan_attention import CONTEXT_FRAMES_KEY, CONTEXT_POSITION_KEY, wan_self_attention_qkv
from ..context import LayoutProvider
from ..processor import ISAAttnProcessorBase
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline

__all__ = ["WanISAAttnProcessor", "WanICLLayout", "WanAdapter", "WanICLPipelineAdapter", "wan_icl_layout"]


class WanISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for Wan self-attention (replaces ``WanAttnProcessor`` on ``attn1``).

    Same computation as ``WanAttnProcessor``: q/k/v projections (fused ``to_qkv`` when
    ``attn.fuse_projections()`` ran), RMSNorm of q and k across heads, split into heads, Wan's RoPE on q and
    k, then ISA (or the stock ``dispatch_attention_fn`` when the call is not eligible), output projection.
    Cross-attention calls (``encoder_hidden_states`` given) and modules with an image branch are handed to
    the stock processor.

    Subclasses for Wan-derived models whose self-attention adds a gated coarse residual (LIVEditor)
    override :meth:`residual_gate`.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.

    Example:
        >>> proc = WanISAAttnProcessor(ISAConfig(), layout=Layout([("target", 1560), ("context", 1560)]))
        >>> transformer.blocks[0].attn1.set_processor(proc)
    """

    def residual_gate(self, attn, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-token gate [B, N, 1] of a coarse attention residual (see ``isa_attention(residual_gate=)``);
        None for stock Wan, which has none."""
        return None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            return self.delegate("cross-attention call", attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        gate = self.residual_gate(attn, hidden_states)
        hidden_states = self.attend(query, key, value, attention_mask=attention_mask, residual_gate=gate)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class WanICLLayout(LayoutProvider):
    """Layout of a Wan in-context call: ``context_frames`` latent frames of context after (or before) the target.

    Args:
        context_frames: number of context latent frames in the transformer's input (the source video's
            latent frames), > 0.
        position: ``"after"`` (default: ``[target frames; context frames]``) or ``"before"``.

    Returns per call (from the 5-D ``hidden_states`` [B, C, F, H, W] and the patch size):
        ``Layout([("target", (F - n)/p_t · T), ("context", n/p_t · T)])`` with T = (H/p_h)·(W/p_w), in the
        given order; None when F ≤ n (no target frame).

    Raises:
        ValueError: a non-positive ``context_frames`` or an unknown ``position``.

    Example:
        >>> apply_isa(transformer, ISAConfig(), layout=WanICLLayout(context_frames=21))  # 480p 81f edit
    """

    def __init__(self, context_frames: int, position: str = "after"):
        if isinstance(context_frames, bool) or not isinstance(context_frames, int) or context_frames <= 0:
            raise ValueError(f"context_frames={context_frames!r} must be a positive int (latent frames of the source video)")
        if position not in ("after", "before"):
            raise ValueError(f"position={position!r} is not supported; supported: 'after', 'before'")
        self.context_frames = context_frames
        self.position = position

    def __repr__(self) -> str:
        return f"WanICLLayout(context_frames={self.context_frames}, position={self.position!r})"

    def __call__(self, transformer, arguments: Mapping[str, Any]) -> Optional[Layout]:
        return wan_icl_layout(transformer, arguments.get("hidden_states"), self.context_frames, self.position)


def wan_icl_layout(transformer, hidden_states, context_frames: int, position: str = "after") -> Optional[Layout]:
    """The :class:`Layout` of a Wan call whose input has ``context_frames`` context latent frames."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        return None
    _, _, F, H, W = hidden_states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    if F <= context_frames or context_frames % p_t or F % p_t:
        return None
    per_frame = (H // p_h) * (W // p_w)
    tgt = (F - context_frames) // p_t * per_frame
    ctx = context_frames // p_t * per_frame
    spans = [("target", tgt), ("context", ctx)]
    return Layout(spans if position == "after" else spans[::-1])


class WanAdapter(FamilyAdapter):
    """Wan: ``blocks.N.attn1`` get :class:`WanISAAttnProcessor`; layout from ``layout=``, ``attention_kwargs`` or a pipeline."""

    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    stock_processor_names = ("WanAttnProcessor",)
    layer_paths = (("blocks", "attn1"),)
    processor_class = WanISAAttnProcessor

    def layout_for_call(self, transformer, arguments):
        kw = arguments.get("attention_kwargs") or {}
        n = kw.get(CONTEXT_FRAMES_KEY) if isinstance(kw, Mapping) else None
        if not n:
            return None
        return wan_icl_layout(transformer, arguments.get("hidden_states"), int(n), kw.get(CONTEXT_POSITION_KEY, "after"))


class _PipelineCallLayout(LayoutProvider):
    """Reads ``context_latent_frames`` / ``context_position`` that the running pipeline call set on itself."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)

    def __call__(self, transformer, arguments):
        pipe = self._pipe()
        n = getattr(pipe, "context_latent_frames", None) if pipe is not None else None
        if not n:
            return None
        return wan_icl_layout(transformer, arguments.get("hidden_states"), n, getattr(pipe, "context_position", "after"))


class WanICLPipelineAdapter(PipelineAdapter):
    """:class:`~isa_plugin.pipelines.WanInContextEditPipeline`: context frames from the running call."""

    name = "wan-icl"
    pipeline_classes = ("WanInContextEditPipeline",)

    def layout_provider(self, pipe, component):
        return _PipelineCallLayout(pipe)


register_family(WanAdapter())
register_pipeline(WanICLPipelineAdapter())
