"""QwenImage family (``QwenImageTransformer2DModel``, served for ``QwenImageEditPipeline`` and
``QwenImageEditPlusPipeline``): ISA on the joint text-image attention.

Layers: the joint attention ``transformer_blocks.N.attn`` of every double-stream block (QwenImage has no
other attention; it runs ``QwenDoubleStreamAttnProcessor2_0``).

Layout: the processor concatenates ``[text; image]``; the edit pipelines feed the image stream as
``[noisy latents; condition image latents ...]`` (``torch.cat([latents, image_latents], dim=1)``) and
describe it in ``img_shapes``: one ``(frames, height, width)`` per segment in token units, the first for
the generated image, one per condition image after it. The family adapter reads the transformer's
forward arguments, so any caller gets

    ``[("text", T), ("target", f0·h0·w0), ("context", f1·h1·w1), ...]``

with T = ``encoder_hidden_states.shape[1]`` (checked against the image sequence length; a call whose
``img_shapes`` do not add up, or that has no condition image, is not an in-context call and runs dense).

Text mask: when the transformer gets an ``encoder_hidden_states_mask`` the stock processor masks padded
text keys. :class:`QwenImageISAAttnProcessor` honours such a mask when it only removes text tokens (the
only thing it can remove here): each batch entry runs ISA over its unmasked tokens, and the masked text
queries attend densely to the unmasked keys, which is exactly the stock masked attention when all
ratios are 1 (see :func:`attend_with_key_mask`). An all-ones mask is dropped. Masks that cannot be
honoured run the stock dense path and are counted (reason ``"attention mask on non-text tokens"``).

Example:
    >>> pipe = QwenImageEditPipeline.from_pretrained("Qwen/Qwen-Image-Edit")
    >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig())
    >>> image = pipe(image=source, prompt="replace the sky").images[0]
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import torch

from ...layout import Layout
from ..processor import ISAAttnProcessorBase, attend_with_key_mask
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from ..rope import rope_qwen

__all__ = ["QwenImageISAAttnProcessor", "QwenImageAdapter", "qwen_image_layout"]


class QwenImageISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for QwenImage joint attention (replaces ``QwenDoubleStreamAttnProcessor2_0``).

    Same computation as ``QwenDoubleStreamAttnProcessor2_0``: q/k/v projections of the image stream
    (``to_q/k/v``) and of the text stream (``add_q/k/v_proj``), split into heads, RMSNorm of q and k per
    head (``norm_q/k``, ``norm_added_q/k``), QwenImage RoPE (complex form, ``image_rotary_emb =
    (image_freqs, text_freqs)``) per stream, joint ``[text; image]`` attention through ISA (or the stock
    ``dispatch_attention_fn``), ``to_out`` / ``to_add_out``. Returns ``(image, text)``. The text mask
    ``encoder_hidden_states_mask`` is handled by :func:`attend_with_key_mask`; an external
    ``attention_mask`` is rejected as the stock processor rejects it.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.

    Example:
        >>> layout = Layout([("text", 200), ("target", 4096), ("context", 4096)])
        >>> transformer.transformer_blocks[0].attn.set_processor(QwenImageISAAttnProcessor(ISAConfig(), layout=layout))
    """

    #: each rank's call is [text; image] of its own chunks (context parallelism: see adapters.parallel)
    cp_streams = "text_first"

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: Optional[torch.FloatTensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} requires encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} does not accept an external attention_mask, as the stock QwenImage processor; "
                "pass encoder_hidden_states_mask and the processor builds the joint mask"
            )

        key_valid = None
        if encoder_hidden_states_mask is not None:
            image_valid = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            key_valid = torch.cat([encoder_hidden_states_mask, image_valid], dim=1)
            attention_mask = key_valid[:, None, None, :]

        n_text = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        heads = (-1, head_dim)

        img_q = attn.to_q(hidden_states).unflatten(-1, heads)
        img_k = attn.to_k(hidden_states).unflatten(-1, heads)
        img_v = attn.to_v(hidden_states).unflatten(-1, heads)
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads)
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads)
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads)

        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = rope_qwen(img_q, img_freqs), rope_qwen(img_k, img_freqs)
            txt_q, txt_k = rope_qwen(txt_q, txt_freqs), rope_qwen(txt_k, txt_freqs)

        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)

        out = attend_with_key_mask(
            self, query, key, value, key_valid, attention_mask=attention_mask, mask_source=encoder_hidden_states_mask
        )
        out = out.flatten(2, 3).to(query.dtype)

        txt_out, img_out = out[:, :n_text, :], out[:, n_text:, :]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


# ----------------------------------------------------------------------------- layout
def _segments(img_shapes) -> Optional[List[Tuple[int, int, int]]]:
    """The per-segment (frames, height, width) of the first batch entry, read as QwenImage's RoPE reads it."""
    if img_shapes is None:
        return None
    shapes = img_shapes[0] if isinstance(img_shapes, list) and len(img_shapes) > 0 else img_shapes
    if not isinstance(shapes, list):
        shapes = [shapes]
    if isinstance(img_shapes, list) and len(img_shapes) > 1 and any(s != img_shapes[0] for s in img_shapes):
        return None  # entries of different sizes: the model itself only supports one
    try:
        return [tuple(int(x) for x in s) for s in shapes]
    except (TypeError, ValueError):
        return None


def qwen_image_layout(encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor, img_shapes) -> Optional[Layout]:
    """The joint-attention :class:`Layout` of a QwenImage call (None when ``img_shapes`` does not fit).

    Args:
        encoder_hidden_states: [B, T, C] text tokens.
        hidden_states: [B, S, C] image tokens, ``[target; condition images ...]``.
        img_shapes: as given to the transformer; segment 0 is the target, the others context.

    Returns:
        ``Layout([("text", T), ("target", n0), ("context", n1), ...])``.
    """
    if not isinstance(encoder_hidden_states, torch.Tensor) or not isinstance(hidden_states, torch.Tensor):
        return None
    segs = _segments(img_shapes)
    if not segs:
        return None
    sizes = [f * h * w for f, h, w in segs]
    if sum(sizes) != hidden_states.shape[1] or sizes[0] <= 0:
        return None
    spans = [("text", encoder_hidden_states.shape[1])] if encoder_hidden_states.shape[1] > 0 else []
    spans.append(("target", sizes[0]))
    spans.extend(("context", n) for n in sizes[1:] if n > 0)
    return Layout(spans)


class QwenImageAdapter(FamilyAdapter):
    """QwenImage: joint attention of every block; layout ``[text; target; condition images]`` from ``img_shapes``."""

    name = "qwenimage"
    transformer_classes = ("QwenImageTransformer2DModel",)
    stock_processor_names = ("QwenDoubleStreamAttnProcessor2_0",)
    layer_paths = (("transformer_blocks", "attn"),)
    processor_class = QwenImageISAAttnProcessor

    def layout_for_call(self, transformer, arguments: Mapping[str, Any]) -> Optional[Layout]:
        return qwen_image_layout(arguments.get("encoder_hidden_states"), arguments.get("hidden_states"), arguments.get("img_shapes"))


register_family(QwenImageAdapter())
# QwenImage edit pipelines: the transformer call reveals the layout (``img_shapes``); the family's inference serves them.
register_pipeline(PipelineAdapter("qwenimage-edit", ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")))
