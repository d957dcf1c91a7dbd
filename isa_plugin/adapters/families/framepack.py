"""HunyuanVideo-Framepack family (``HunyuanVideoFramepackTransformer3DModel``, served for
``HunyuanVideoFramepackPipeline``): ISA on the joint video-text attention.

Layers: the joint attention ``attn`` of every double-stream block (``transformer_blocks.N.attn``) and of
every single-stream block (``single_transformer_blocks.N.attn``), which run
``HunyuanVideoAttnProcessor2_0``. The text token refiner (``context_embedder.token_refiner.
refiner_blocks.N.attn``, a plain ``AttnProcessor2_0`` self-attention over text) keeps its processor.

Layout: the transformer packs the history context in front of the noisy window and the processor puts
the text stream after the video, so one joint-attention call covers

    ``[history 4x; history 2x; clean 1x; noisy window; text]``

(``_pack_history_states`` prepends clean, then 2x, then 4x). The family adapter computes the video spans
from the forward arguments: noisy ``(F/p_t)·(H/p)·(W/p)`` from ``hidden_states``; clean 1x
``F_c·(H_c/2)·(W_c/2)`` from ``latents_clean``; 2x and 4x ``⌈F/k⌉·⌈H/2k⌉·⌈W/2k⌉`` (k = 2, 4; the
history embedder pads to its kernel) from ``latents_history_2x/4x`` — each only when its frame indices
are given too, as the transformer does. History and clean tokens are ``"context"``, the noisy window
``"target"``. The text span (SigLIP image tokens, then LLaMA tokens) is whatever the call has beyond the
video tokens: with batch 1 the transformer trims padded text, so its length varies per prompt.

Text mask: with batch > 1 the transformer passes a ``[B, 1, 1, N]`` key mask hiding padded text. It is
honoured as for QwenImage (:func:`isa_plugin.adapters.processor.attend_with_key_mask`): per batch entry,
ISA over its unmasked tokens, dense attention of its padded text queries over its unmasked keys. Masks
of another shape or on video tokens run the stock dense path and are counted.

Example:
    >>> pipe = HunyuanVideoFramepackPipeline.from_pretrained(...)
    >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig())
    >>> frames = pipe(image=first_frame, prompt="a cat walks", num_frames=129).frames[0]
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch

from ...layout import Layout
from ..processor import ISAAttnProcessorBase, attend_with_key_mask
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from ..rope import rope_diffusers

__all__ = ["FramepackISAAttnProcessor", "FramepackAdapter", "FramepackLayout", "framepack_video_spans"]


class FramepackISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for HunyuanVideo(-Framepack) joint attention (replaces ``HunyuanVideoAttnProcessor2_0``).

    Same computation as ``HunyuanVideoAttnProcessor2_0``: in single-stream blocks (no ``add_q_proj``) the
    text tokens are appended to the video tokens before the shared projections and RoPE covers the video
    part only; in double-stream blocks the video q/k/v (``to_q/k/v``) get RoPE and the text q/k/v
    (``add_q/k/v_proj``) are appended after; RMSNorm of q and k per head in both; then ISA over
    ``[video; text]`` (or the stock ``dispatch_attention_fn``), and ``to_out`` / ``to_add_out`` where the
    module has them. Returns ``(video, text)``.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.

    Example:
        >>> layout = Layout([("context", 836), ("target", 14040), ("text", 800)])
        >>> transformer.transformer_blocks[0].attn.set_processor(FramepackISAAttnProcessor(ISAConfig(), layout=layout))
    """

    #: each rank's call is [video; text] of its own chunks (context parallelism: see adapters.parallel)
    cp_streams = "text_last"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        single = attn.add_q_proj is None
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        if single and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single and encoder_hidden_states is not None:
                query = torch.cat([rope_diffusers(query[:, :-n_text], image_rotary_emb), query[:, -n_text:]], dim=1)
                key = torch.cat([rope_diffusers(key[:, :-n_text], image_rotary_emb), key[:, -n_text:]], dim=1)
            else:
                query = rope_diffusers(query, image_rotary_emb)
                key = rope_diffusers(key, image_rotary_emb)

        if not single and encoder_hidden_states is not None:
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)

        key_valid = _key_valid(attention_mask, query.shape[:2])
        if attention_mask is not None and key_valid is None:
            out = self.attend(query, key, value, attention_mask=attention_mask)
        else:
            out = attend_with_key_mask(
                self, query, key, value, key_valid, attention_mask=attention_mask, mask_source=attention_mask
            )
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :-n_text], out[:, -n_text:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[0](out)
                out = attn.to_out[1](out)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return out, encoder_hidden_states


def _key_valid(attention_mask: Optional[torch.Tensor], bn: Tuple[int, int]) -> Optional[torch.Tensor]:
    """[B, N] bool key mask from a boolean [B, 1, 1, N] mask (None for no mask or any other form)."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    B, N = bn
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or attention_mask.shape[-1] != N:
        return None
    return attention_mask[:, 0, 0, :].expand(B, N)


# ----------------------------------------------------------------------------- layout
def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def framepack_video_spans(transformer, arguments: Mapping[str, Any]) -> Optional[List[Tuple[str, int]]]:
    """Video spans of a Framepack call, in sequence order ``[4x; 2x; clean; noisy]`` (None if unknown).

    Args:
        transformer: the ``HunyuanVideoFramepackTransformer3DModel`` (its patch sizes are read).
        arguments: the bound forward arguments (``hidden_states`` [B, C, F, H, W], ``latents_clean``,
            ``latents_history_2x``, ``latents_history_4x`` and their ``indices_*``).
    """
    hs = arguments.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.ndim != 5:
        return None
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    _, _, F, H, W = hs.shape
    noisy = (F // p_t) * (H // p) * (W // p)
    if noisy <= 0:
        return None

    def present(name, idx_name):
        x = arguments.get(name)
        return x if isinstance(x, torch.Tensor) and x.ndim == 5 and arguments.get(idx_name) is not None else None

    spans = []
    h4 = present("latents_history_4x", "indices_latents_history_4x")
    if h4 is not None:
        spans.append(("context", _ceil(h4.shape[2], 4) * _ceil(h4.shape[3], 8) * _ceil(h4.shape[4], 8)))
    h2 = present("latents_history_2x", "indices_latents_history_2x")
    if h2 is not None:
        spans.append(("context", _ceil(h2.shape[2], 2) * _ceil(h2.shape[3], 4) * _ceil(h2.shape[4], 4)))
    clean = present("latents_clean", "indices_latents_clean")
    if clean is not None:
        spans.append(("context", clean.shape[2] * (clean.shape[3] // 2) * (clean.shape[4] // 2)))
    spans.append(("target", noisy))
    return [(k, n) for k, n in spans if n > 0]


class FramepackLayout:
    """Layout of one Framepack call as a function of the attention call's length: video spans, then text.

    Args:
        video_spans: ``[(kind, length), ...]`` of the packed video tokens (see :func:`framepack_video_spans`).

    Calling it with the joint sequence length N returns ``Layout(video_spans + [("text", N - video)])``
    (no text span when N equals the video length; None when N is shorter).
    """

    def __init__(self, video_spans: List[Tuple[str, int]]):
        self.video_spans = list(video_spans)
        self.video_tokens = sum(n for _, n in self.video_spans)

    def __call__(self, seq_len: int) -> Optional[Layout]:
        n_text = seq_len - self.video_tokens
        if n_text < 0:
            return None
        return Layout(self.video_spans + ([("text", n_text)] if n_text > 0 else []))

    def __repr__(self) -> str:
        return f"FramepackLayout({self.video_spans!r})"


class FramepackAdapter(FamilyAdapter):
    """HunyuanVideo-Framepack: joint attention of double and single blocks (not the text refiner);
    layout ``[history 4x; history 2x; clean; noisy; text]`` from the forward arguments."""

    name = "framepack"
    transformer_classes = ("HunyuanVideoFramepackTransformer3DModel",)
    stock_processor_names = ("HunyuanVideoAttnProcessor2_0",)
    layer_paths = (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn"))
    processor_class = FramepackISAAttnProcessor

    def layout_for_call(self, transformer, arguments: Mapping[str, Any]) -> Optional[Callable[[int], Optional[Layout]]]:
        spans = framepack_video_spans(transformer, arguments)
        return FramepackLayout(spans) if spans else None


register_family(FramepackAdapter())
# HunyuanVideoFramepackPipeline: history latents are forward arguments; the family's inference serves it.
register_pipeline(PipelineAdapter("framepack", ("HunyuanVideoFramepackPipeline",)))
