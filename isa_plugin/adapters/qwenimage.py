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

from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch

from ..attention import isa_attention
from ..layout import Layout
from .base import FamilyAdapter, ISAAttnProcessorBase, PipelineAdapter, register_family, register_pipeline

__all__ = ["QwenImageISAAttnProcessor", "QwenImageAdapter", "QwenImageEditPipelineAdapter", "qwen_image_layout", "attend_with_key_mask"]


def _rope(x: torch.Tensor, freqs) -> torch.Tensor:
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(x, freqs, use_real=False)


# ----------------------------------------------------------------------------- key-padding masks
def _key_mask_plan(key_valid: torch.Tensor, layout: Layout) -> Tuple[Optional[str], Optional[list]]:
    """Per batch entry: (indices of valid tokens, indices of masked tokens, layout of the valid tokens).

    Returns ``(reason, None)`` when ISA cannot honour the mask, ``(None, plan)`` otherwise.
    """
    lengths = torch.tensor([n for _, n in layout.spans])
    is_text = torch.repeat_interleave(torch.tensor([k == "text" for k, _ in layout.spans]), lengths)
    valid = key_valid.detach().to("cpu", torch.bool)
    if bool((~valid & ~is_text).any()):
        return "attention mask on non-text tokens", None
    plan = []
    bounds = torch.tensor([0] + [n for _, n in layout.spans]).cumsum(0).tolist()
    for row in valid:
        spans = []
        for s, (kind, _) in enumerate(layout.spans):
            n = int(row[bounds[s] : bounds[s + 1]].sum())
            if n > 0:
                spans.append((kind, n))
        keep = torch.nonzero(row).flatten()
        drop = torch.nonzero(~row).flatten()
        plan.append((keep, drop, Layout(spans)))
    return None, plan


_PLANS_ATTR = "_isa_key_mask_plans"


def _cached_mask_plan(proc: ISAAttnProcessorBase, key_valid: torch.Tensor, layout: Optional[Layout], mask_source, device):
    """``(all_valid, reason, plan)`` for a key mask, computed once per transformer call and mask.

    The per-call :class:`~isa_plugin.adapters.base.CallContext` holds the cache, keyed by the identity of
    ``mask_source`` (the transformer-level mask every layer of the call derives its mask from), so the
    host synchronisation and index building happen once per forward, not once per layer.
    """
    ctx = proc.state.context if proc.state is not None else None
    cache = key = None
    if ctx is not None and mask_source is not None:
        cache = ctx.__dict__.setdefault(_PLANS_ATTR, {})
        key = (id(mask_source), tuple(key_valid.shape), layout, str(device))
        hit = cache.get(key)
        if hit is not None and hit[0] is mask_source:
            return hit[1]
    all_valid = bool(key_valid.all())
    reason, plan = None, None
    if not all_valid and layout is not None and layout.num_tokens == key_valid.shape[1]:
        reason, plan = _key_mask_plan(key_valid, layout)
        if plan is not None:
            plan = [(keep.to(device), drop.to(device), lay) for keep, drop, lay in plan]
    result = (all_valid, reason, plan)
    if cache is not None:
        cache[key] = (mask_source, result)  # holding mask_source keeps its id from being reused
    return result


def attend_with_key_mask(
    proc: ISAAttnProcessorBase,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    dense: Callable[[], torch.Tensor],
    *,
    parallel_config: Any = None,
    mask_source: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ISA for a call whose stock attention masks some keys (a key-padding mask), or the stock dense path.

    Args:
        proc: the calling processor (its config, layout, counters and observer are used).
        q, k, v: [B, N, H, D] after norms and RoPE.
        key_valid: [B, N] bool, True for keys every query may attend (None: no mask).
        dense: zero-argument callable running the model's own masked attention.
        parallel_config: the processor's context-parallel config (ISA falls back under it).
        mask_source: the transformer-level mask ``key_valid`` derives from (same object for every layer of
            a call); when given, the mask analysis is cached for the rest of the transformer call.

    Returns:
        [B, N, H, D]. Without a mask, or with an all-True one, this is ``proc._attend``. Otherwise, when
        every masked key is a text token, each batch entry runs ISA over its unmasked tokens (the layout's
        text spans shrink by the masked tokens) and its masked queries attend densely to its unmasked keys
        — exactly the stock masked attention when all ratios are 1. Masks on other tokens fall back to
        ``dense()`` with the reason ``"attention mask on non-text tokens"``. The observer, if any, sees
        the unmasked q, k, v and the full layout.
    """
    if key_valid is None:
        return proc._attend(q, k, v, dense, attention_mask=None, parallel_config=parallel_config)
    if key_valid.dtype != torch.bool or key_valid.shape != q.shape[:2]:
        return proc._attend(q, k, v, dense, attention_mask=key_valid, parallel_config=parallel_config)
    from ..attention import dense_attention

    N = q.shape[1]
    layout = proc._resolve_layout(N)
    all_valid, mask_reason, plan = _cached_mask_plan(proc, key_valid, layout, mask_source, q.device)
    if all_valid:
        return proc._attend(q, k, v, dense, attention_mask=None, parallel_config=parallel_config)
    if proc.observer is not None:
        proc.observer(proc.layer_name, q, k, v, layout, proc._step())
    reason = proc._why_dense(q, layout, None, parallel_config) or mask_reason
    if reason is None:
        sub_reasons = [proc._why_dense(q[:1, : keep.numel()], lay, None, parallel_config) for keep, _, lay in plan]
        reason = next((r for r in sub_reasons if r is not None), None)
    if reason is not None:
        proc._count_fallback(reason)
        return dense()
    out = torch.empty_like(q)
    used = True
    fallback = None
    backend = None
    for b, (keep, drop, lay) in enumerate(plan):
        qb, kb, vb = q[b : b + 1, keep], k[b : b + 1, keep], v[b : b + 1, keep]
        ob, info = isa_attention(qb, kb, vb, lay, proc.config, return_info=True)
        out[b, keep] = ob[0]
        if not info.used_isa:
            used, fallback = False, info.reason or "dense"
        backend = info.backend
        if drop.numel():
            out[b, drop] = dense_attention(q[b : b + 1, drop], kb, vb)[0]
    if used:
        proc._count_isa(backend)
    else:
        proc._count_fallback(fallback)
    return out


# ----------------------------------------------------------------------------- processor
class QwenImageISAAttnProcessor(ISAAttnProcessorBase):
    """ISA for QwenImage joint attention (replaces ``QwenDoubleStreamAttnProcessor2_0``).

    Same computation as ``QwenDoubleStreamAttnProcessor2_0``: q/k/v projections of the image stream
    (``to_q/k/v``) and of the text stream (``add_q/k/v_proj``), split into heads, RMSNorm of q and k per
    head (``norm_q/k``, ``norm_added_q/k``), QwenImage RoPE (complex form, ``image_rotary_emb =
    (image_freqs, text_freqs)``) per stream, joint ``[text; image]`` attention through ISA (or the stock
    ``dispatch_attention_fn``), ``to_out`` / ``to_add_out``. Returns ``(image, text)``. The text mask
    ``encoder_hidden_states_mask`` is handled by :func:`attend_with_key_mask`; an external
    ``attention_mask`` is rejected as the stock processor rejects it.

    Args: see :class:`~isa_plugin.adapters.base.ISAAttnProcessorBase`.

    Example:
        >>> layout = Layout([("text", 200), ("target", 4096), ("context", 4096)])
        >>> transformer.transformer_blocks[0].attn.set_processor(QwenImageISAAttnProcessor(ISAConfig(), layout=layout))
    """

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
            img_q, img_k = _rope(img_q, img_freqs), _rope(img_k, img_freqs)
            txt_q, txt_k = _rope(txt_q, txt_freqs), _rope(txt_k, txt_freqs)

        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)

        parallel_config = self._parallel_config

        dense = self._dispatch_dense(query, key, value, attention_mask)

        out = attend_with_key_mask(
            self, query, key, value, key_valid, dense, parallel_config=parallel_config, mask_source=encoder_hidden_states_mask
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


class QwenImageEditPipelineAdapter(PipelineAdapter):
    """QwenImage edit pipelines: the transformer call reveals the layout (``img_shapes``), so the family's
    inference serves them; registered so the supported pipelines are listed."""

    name = "qwenimage-edit"
    pipeline_classes = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")

    def layout_provider(self, pipe, component):
        return None


register_family(QwenImageAdapter())
register_pipeline(QwenImageEditPipelineAdapter())
