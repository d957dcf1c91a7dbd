"""Flux family (``FluxTransformer2DModel``, served for ``FluxKontextPipeline``): ISA on the joint attention.

Layers: the joint attention ``attn`` of every double-stream block (``transformer_blocks.N.attn``) and of
every single-stream block (``single_transformer_blocks.N.attn``). Flux has no cross-attention or refiner
blocks; layers running another processor (IP-Adapter) are refused by :func:`~isa_plugin.apply_isa`.

Layout: every joint-attention call of one forward covers the same sequence, ``[text; image]``: double
blocks concatenate the text stream's q/k/v in front of the image stream's, single blocks get the
concatenation ``[text; image]`` from the block. The image stream of Flux Kontext is
``[noisy latents; context image latents]`` (the pipeline concatenates ``[latents, image_latents]``) and
the context tokens are marked in the position ids: ``img_ids[:, 0]`` is 0 for the noisy latents and 1 for
the context image. The family adapter reads this from the transformer's forward arguments, so any caller
(the pipeline or a direct transformer call) gets

    ``[("text", T), ("target", n_target), ("context", n_context)]``

with T = ``encoder_hidden_states.shape[1]``; consecutive runs of ``img_ids[:, 0]`` give the image spans in
their order (0 -> target, anything else -> context), so several reference images or another order work
too. A call without context tokens (plain text-to-image Flux) runs dense attention, counted with the
reason ``"no context tokens (not an in-context call)"``.

Example:
    >>> pipe = FluxKontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev")
    >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig())
    >>> image = pipe(image=source, prompt="make it snowy").images[0]
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import torch

from ...layout import Layout
from ..processor import ISAAttnProcessorBase
from ..registry import FamilyAdapter, PipelineAdapter, register_family, register_pipeline
from ..rope import rope_diffusers

__all__ = ["FluxISAAttnProcessor", "FluxAdapter", "flux_layout", "image_id_spans"]


class FluxISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for Flux joint attention (replaces ``FluxAttnProcessor`` on ``transformer_blocks.N.attn`` and
    ``single_transformer_blocks.N.attn``).

    Same computation as ``FluxAttnProcessor``: q/k/v projections of the image stream (fused ``to_qkv``
    when ``attn.fuse_projections()`` ran), split into heads of ``attn.head_dim``, RMSNorm of q and k per
    head; in double blocks the text stream's projections (``add_*_proj`` or fused ``to_added_qkv``) and
    norms, concatenated in front; Flux RoPE on the joint q and k; then ISA over the joint sequence (or the
    stock ``dispatch_attention_fn`` when the call is not eligible); output projections ``to_out`` and
    ``to_add_out`` in double blocks, none in single blocks. Returns ``(image, text)`` in double blocks and
    the joint tensor in single blocks, as the stock processor does.

    Args: see :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`.

    Example:
        >>> layout = Layout([("text", 512), ("target", 4096), ("context", 4096)])
        >>> transformer.transformer_blocks[0].attn.set_processor(FluxISAAttnProcessor(ISAConfig(), layout=layout))
    """

    #: each rank's call is [text; image] of its own chunks (context parallelism: see adapters.parallel)
    cp_streams = "text_first"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            enc_q = enc_k = enc_v = None
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                enc_q, enc_k, enc_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
            enc_q = enc_k = enc_v = None
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                enc_q = attn.add_q_proj(encoder_hidden_states)
                enc_k = attn.add_k_proj(encoder_hidden_states)
                enc_v = attn.add_v_proj(encoder_hidden_states)

        heads = (-1, attn.head_dim)
        query = attn.norm_q(query.unflatten(-1, heads))
        key = attn.norm_k(key.unflatten(-1, heads))
        value = value.unflatten(-1, heads)

        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, heads))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, heads))
            enc_v = enc_v.unflatten(-1, heads)
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)

        if image_rotary_emb is not None:
            query = rope_diffusers(query, image_rotary_emb)
            key = rope_diffusers(key, image_rotary_emb)

        out = self.attend(query, key, value, attention_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image_out = attn.to_out[0](image_out.contiguous())
        image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def image_id_spans(img_ids: torch.Tensor) -> List[Tuple[str, int]]:
    """Image spans from Flux position ids: runs of ``img_ids[:, 0]`` (0 -> "target", other -> "context").

    Args:
        img_ids: [S, 3] (or the deprecated [B, S, 3]) position ids of the image stream.

    Returns:
        ``[(kind, length), ...]`` in sequence order, lengths summing to S.
    """
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    marker = img_ids[:, 0].detach()
    n = marker.numel()
    if n == 0:
        return []
    change = torch.nonzero(marker[1:] != marker[:-1]).flatten().add_(1).tolist()
    bounds = [0] + change + [n]
    first = marker[bounds[:-1]].tolist()
    return [("target" if v == 0 else "context", bounds[i + 1] - bounds[i]) for i, v in enumerate(first)]


def flux_layout(encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor, img_ids: torch.Tensor) -> Optional[Layout]:
    """The joint-attention :class:`Layout` of a Flux call, ``[text; image spans]`` (None when inconsistent).

    Args:
        encoder_hidden_states: [B, T, C] text tokens given to the transformer.
        hidden_states: [B, S, C] image tokens (packed latents, Kontext: noisy then context).
        img_ids: [S, 3] image position ids; ``img_ids[:, 0] != 0`` marks context tokens.
    """
    if not all(isinstance(t, torch.Tensor) for t in (encoder_hidden_states, hidden_states, img_ids)):
        return None
    spans = image_id_spans(img_ids)
    if sum(n for _, n in spans) != hidden_states.shape[1] or not any(k == "target" for k, _ in spans):
        return None
    text = [("text", encoder_hidden_states.shape[1])] if encoder_hidden_states.shape[1] > 0 else []
    return Layout(text + spans)


class FluxAdapter(FamilyAdapter):
    """Flux: joint attention of double and single blocks; layout ``[text; target; context]`` from ``img_ids``."""

    name = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    stock_processor_names = ("FluxAttnProcessor",)
    layer_paths = (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn"))
    processor_class = FluxISAAttnProcessor

    def layout_for_call(self, transformer, arguments: Mapping[str, Any]) -> Optional[Layout]:
        return flux_layout(arguments.get("encoder_hidden_states"), arguments.get("hidden_states"), arguments.get("img_ids"))


register_family(FluxAdapter())
# Flux Kontext pipelines: the transformer call reveals the layout (``img_ids``); the family's inference serves them.
register_pipeline(PipelineAdapter("flux-kontext", ("FluxKontextPipeline", "FluxKontextInpaintPipeline")))
