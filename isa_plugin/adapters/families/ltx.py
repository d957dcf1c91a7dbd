"""LTX-Video family (``LTXVideoTransformer3DModel``): ISA on ``transformer_blocks.N.attn1``.

Layers: the video self-attention ``transformer_blocks.N.attn1``; the text cross-attention ``attn2`` keeps
its stock processor.

Layout: ``LTXConditionPipeline`` prepends the packed tokens of every condition with ``frame_index > 0``
to the noisy latent tokens and passes ``video_coords`` [B, 3, S] (frame, y, x per token) to the
transformer. A condition's frame coordinates start at its ``frame_index`` (> 0), while the noisy latent
grid starts at frame coordinate 0, so the noisy tokens begin at the first token whose frame coordinate
is 0: ``Layout([("context", start), ("target", S - start)])``. Conditions at frame 0 are written in place
into the noisy latents and stay in the target span. Calls without ``video_coords`` (``LTXPipeline``,
``LTXImageToVideoPipeline``: no prepended tokens) have no context span and run dense with the reason
``"no context tokens (not an in-context call)"``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ...layout import Layout
from ..context import LayoutProvider
from ..processor import ISAAttnProcessorBase
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from ..rope import rope_interleaved_channels

__all__ = ["LTXISAAttnProcessor", "LTXAdapter", "LTXConditionPipelineAdapter", "ltx_prefix_layout", "ltx_self_attention"]



def ltx_self_attention(proc: ISAAttnProcessorBase, attn, hidden_states: torch.Tensor, attention_mask, rope, query_freqs, key_freqs,
                       value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The self-attention core shared by the LTX and LTX-2 processors, as their stock processors compute it:
    mask preparation, q/k/v projections (``value`` given: used as the values), RMSNorm across heads,
    ``rope(x, freqs)`` on [B, S, C] when given, split into heads, ISA (or the stock attention); returns
    [B, S, C] before the output projection."""
    batch_size, sequence_length, _ = hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    if value is None:
        value = attn.to_v(hidden_states)

    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if rope is not None:
        query = rope(query, query_freqs)
        key = rope(key, key_freqs)

    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))

    out = proc.attend(query, key, value, attention_mask=attention_mask)
    return out.flatten(2, 3).to(query.dtype)


class LTXISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for LTX-Video self-attention (replaces ``LTXVideoAttnProcessor`` on ``attn1``).

    Same computation as the stock processor: optional mask preparation, q/k/v projections, RMSNorm across
    heads, RoPE on [B, S, C] before splitting heads, then ISA (or the stock ``dispatch_attention_fn``),
    output projection. Cross-attention calls are handed to the stock processor.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self.delegate("cross-attention call", attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        rope = (lambda x, freqs: rope_interleaved_channels(x, freqs)) if image_rotary_emb is not None else None
        hidden_states = ltx_self_attention(self, attn, hidden_states, attention_mask, rope, image_rotary_emb, image_rotary_emb)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def ltx_prefix_layout(hidden_states: Any, video_coords: Any) -> Optional[Layout]:
    """Layout of an LTX call from its per-token coordinates: prepended conditions are context.

    Args:
        hidden_states: [B, S, C] packed tokens.
        video_coords: [B, 3, S] (frame, y, x) or None.

    Returns:
        ``[("context", start), ("target", S - start)]`` with ``start`` the first token of frame coordinate 0
        (all target when ``start == 0``); all target when ``video_coords`` is None; None when the
        coordinates do not fit ``hidden_states`` or no token sits at frame 0.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3:
        return None
    S = hidden_states.shape[1]
    if video_coords is None:
        return Layout([("target", S)])
    if not isinstance(video_coords, torch.Tensor) or video_coords.ndim != 3 or video_coords.shape[-1] != S:
        return None
    at_zero = (video_coords[0, 0] == 0).nonzero()
    if at_zero.numel() == 0:
        return None
    start = int(at_zero[0, 0])
    return Layout([("target", S)]) if start == 0 else Layout([("context", start), ("target", S - start)])


class LTXAdapter(FamilyAdapter):
    """LTX-Video: ``transformer_blocks.N.attn1`` get :class:`LTXISAAttnProcessor`; layout from ``video_coords``."""

    name = "ltx"
    transformer_classes = ("LTXVideoTransformer3DModel",)
    stock_processor_names = ("LTXVideoAttnProcessor",)
    layer_paths = (("transformer_blocks", "attn1"),)
    processor_class = LTXISAAttnProcessor

    def layout_for_call(self, transformer, arguments: Mapping[str, Any]):
        return ltx_prefix_layout(arguments.get("hidden_states"), arguments.get("video_coords"))


class _PrefixLayout(LayoutProvider):
    def __call__(self, transformer, arguments):
        return ltx_prefix_layout(arguments.get("hidden_states"), arguments.get("video_coords"))


class LTXConditionPipelineAdapter(PipelineAdapter):
    """``LTXConditionPipeline``: conditions with ``frame_index > 0`` are prepended context (from ``video_coords``)."""

    name = "ltx-condition"
    pipeline_classes = ("LTXConditionPipeline",)

    def layout_provider(self, pipe, component):
        return _PrefixLayout()


register_family(LTXAdapter())
register_pipeline(LTXConditionPipelineAdapter())
