"""LTX-2 family (``LTX2VideoTransformer3DModel``): ISA on the video self-attention ``transformer_blocks.N.attn1``.

Layers: only the video self-attention ``attn1``. The audio self-attention ``audio_attn1``, the text
cross-attentions ``attn2`` / ``audio_attn2`` and the audio<->video cross-attentions keep their stock
processors. Both stock video processors are served: ``LTX2AudioVideoAttnProcessor`` and, for models built
with ``perturbed_attn=True`` (spatio-temporal guidance), ``LTX2PerturbedAttnProcessor``.

Layout: LTX-2 pipelines pass the noisy latent grid (``num_frames``, ``height``, ``width``, latent units)
to the transformer and append everything else after the noisy tokens: keyframe conditions
(``LTX2ConditionPipeline``) and the IC-LoRA reference video (``LTX2InContextPipeline``, which exists in
diffusers 0.42.1). So ``Layout([("target", F·H·W / patch volume), ("context", S - that)])``; a call with
nothing appended is not in-context (dense, reason ``"no context tokens (not an in-context call)"``), and
a call without the grid arguments has an unknown layout. When the IC-LoRA pipeline builds a
``video_self_attention_mask`` (reference strengths below 1 or a conditioning attention mask), the video
self-attention gets a mask and runs dense (reason ``"attention mask present"``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ...layout import Layout
from ..context import LayoutProvider
from ..processor import ISAAttnProcessorBase
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from ..rope import rope_interleaved_channels, rope_split_halves
from .ltx import ltx_self_attention

__all__ = ["LTX2ISAAttnProcessor", "LTX2PerturbedISAAttnProcessor", "LTX2Adapter", "LTX2InContextPipelineAdapter", "ltx2_appended_layout"]


def _rope(attn, x, freqs):
    if attn.rope_type == "interleaved":
        return rope_interleaved_channels(x, freqs)
    if attn.rope_type == "split":
        return rope_split_halves(x, freqs)
    return x


class LTX2ISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for LTX-2 video self-attention (replaces ``LTX2AudioVideoAttnProcessor`` on ``attn1``).

    Same computation as the stock processor: optional mask preparation, per-head gate logits (gated
    models), q/k/v projections, RMSNorm across heads, interleaved or split RoPE on [B, S, C], then ISA (or
    the stock ``dispatch_attention_fn``), gates, output projection. Cross-attention calls are handed to the
    stock processor.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.
    """

    def _self_attention(self, attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb, value=None):
        rope = None
        if query_rotary_emb is not None:
            rope = lambda x, freqs: _rope(attn, x, freqs)  # noqa: E731
        key_freqs = key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
        return ltx_self_attention(self, attn, hidden_states, attention_mask, rope, query_rotary_emb, key_freqs, value)

    @staticmethod
    def _gate_and_project(attn, hidden_states, gate_logits):
        if gate_logits is not None:
            hidden_states = hidden_states.unflatten(2, (attn.heads, -1))
            hidden_states = hidden_states * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
            hidden_states = hidden_states.flatten(2, 3)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        query_rotary_emb: Optional[tuple] = None,
        key_rotary_emb: Optional[tuple] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self.delegate(
                "cross-attention call", attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb
            )
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        out = self._self_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        return self._gate_and_project(attn, out, gate_logits)


class LTX2PerturbedISAAttnProcessor(LTX2ISAAttnProcessor):
    """ISA for LTX-2 video self-attention with spatio-temporal guidance (replaces ``LTX2PerturbedAttnProcessor``).

    As :class:`LTX2ISAAttnProcessor`, plus the stock perturbation: when every batch entry is perturbed the
    attention is skipped (the value projection is used, as in the stock processor), otherwise the attention
    output is blended with the values by ``perturbation_mask``.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        query_rotary_emb: Optional[tuple] = None,
        key_rotary_emb: Optional[tuple] = None,
        perturbation_mask: Optional[torch.Tensor] = None,
        all_perturbed: Optional[bool] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self.delegate(
                "cross-attention call", attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                key_rotary_emb, perturbation_mask, all_perturbed,
            )
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False
        if all_perturbed:
            self.record_fallback("all perturbed (attention skipped)")
            out = value
        else:
            out = self._self_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb, value=value)
            if perturbation_mask is not None:
                out = torch.lerp(value, out, perturbation_mask)
        return self._gate_and_project(attn, out, gate_logits)


def ltx2_appended_layout(transformer, arguments: Mapping[str, Any]) -> Optional[Layout]:
    """Layout of an LTX-2 call: the noisy grid (``num_frames·height·width``) first, appended tokens are context.

    Returns None when the grid arguments are missing or larger than the sequence.
    """
    x = arguments.get("hidden_states")
    f, h, w = arguments.get("num_frames"), arguments.get("height"), arguments.get("width")
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or None in (f, h, w):
        return None
    cfg = transformer.config
    base = (int(f) // cfg.patch_size_t) * (int(h) // cfg.patch_size) * (int(w) // cfg.patch_size)
    S = x.shape[1]
    if base <= 0 or base > S:
        return None
    return Layout([("target", S)]) if base == S else Layout([("target", base), ("context", S - base)])


class LTX2Adapter(FamilyAdapter):
    """LTX-2: video ``transformer_blocks.N.attn1`` get ISA; appended tokens are context."""

    name = "ltx2"
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    stock_processor_names = ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
    layer_paths = (("transformer_blocks", "attn1"),)

    def make_processor(self, layer_name, module, config, original):
        cls = LTX2PerturbedISAAttnProcessor if type(original).__name__ == "LTX2PerturbedAttnProcessor" else LTX2ISAAttnProcessor
        return cls(config, layer_name=layer_name, original=original)

    def layout_for_call(self, transformer, arguments):
        return ltx2_appended_layout(transformer, arguments)


class _AppendedLayout(LayoutProvider):
    def __call__(self, transformer, arguments):
        return ltx2_appended_layout(transformer, arguments)


class LTX2InContextPipelineAdapter(PipelineAdapter):
    """``LTX2InContextPipeline`` (IC-LoRA reference video) and ``LTX2ConditionPipeline`` (keyframes): appended context."""

    name = "ltx2-in-context"
    pipeline_classes = ("LTX2InContextPipeline", "LTX2ConditionPipeline")

    def layout_provider(self, pipe, component):
        return _AppendedLayout()


register_family(LTX2Adapter())
register_pipeline(LTX2InContextPipelineAdapter())
