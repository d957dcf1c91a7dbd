"""Self-attention pieces of Wan and of the Wan-based models this package ports (LIVEditor), in plain PyTorch.

The package's own models (:mod:`isa_plugin.pipelines.liveditor`) and the Wan adapter families
(:mod:`isa_plugin.adapters.families.wan`, :mod:`isa_plugin.adapters.families.liveditor`) compute these the
same way, so they live here, below both: the adapters import them from the pipelines, never the reverse.
This module imports torch only (no diffusers), so importing the adapters stays light.

- :func:`wan_self_attention_qkv`: q, k, v of a Wan self-attention layer, exactly as diffusers'
  ``WanAttnProcessor`` makes them (projections, RMSNorm of q and k, heads, Wan's RoPE);
- :func:`rope_interleaved_pairs`: Wan's rotary position embedding (consecutive channel pairs);
- :func:`liveditor_gate`: LIVEditor's learned per-token gate on its coarse attention residual;
- :data:`CONTEXT_FRAMES_KEY` / :data:`CONTEXT_POSITION_KEY`: the ``attention_kwargs`` keys through which
  :class:`~isa_plugin.pipelines.WanInContextEditPipeline` (or a user) tells the Wan adapter where the
  context latent frames of a call are.

Example:
    >>> q, k, v = wan_self_attention_qkv(model.blocks[0].attn1, x, rotary_emb)   # each [B, N, H, D]
    >>> gate = liveditor_gate(model.blocks[0].attn1, x)                          # [B, N, 1]
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["wan_self_attention_qkv", "rope_interleaved_pairs", "liveditor_gate", "CONTEXT_FRAMES_KEY", "CONTEXT_POSITION_KEY"]

#: ``attention_kwargs`` keys read by the Wan adapter (number / position of context latent frames)
CONTEXT_FRAMES_KEY = "isa_context_frames"
CONTEXT_POSITION_KEY = "isa_context_position"


def rope_interleaved_pairs(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on [B, S, H, D]: rotate consecutive (even, odd) channel pairs.

    Args:
        x: [B, S, H, D] queries or keys (D even).
        freqs_cos, freqs_sin: [1, S, 1, D] tables as diffusers' ``WanRotaryPosEmbed`` returns them (each
            value repeated for the two channels of a pair).

    Returns:
        [B, S, H, D] in ``x``'s dtype.

    Example:
        >>> q = rope_interleaved_pairs(q, *rotary_emb)
    """
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.type_as(x)


def wan_self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb: Optional[tuple]):
    """q, k, v [B, N, H, D] of a Wan self-attention layer, exactly as diffusers' ``WanAttnProcessor`` makes them.

    Projections (fused ``to_qkv`` when ``attn.fuse_projections()`` ran), RMSNorm of q and k across heads,
    split into heads, Wan's interleaved-pair RoPE on q and k (skipped when ``rotary_emb`` is None).

    Args:
        attn: a diffusers ``WanAttention`` used as self-attention.
        hidden_states: [B, N, dim].
        rotary_emb: ``(cos, sin)``, each [1, N, 1, head_dim], or None.

    Returns:
        ``(query, key, value)``, each [B, N, H, head_dim].

    Example:
        >>> q, k, v = wan_self_attention_qkv(transformer.blocks[0].attn1, x, rotary_emb)
    """
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

    query = attn.norm_q(query)
    key = attn.norm_k(key)

    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))

    if rotary_emb is not None:
        query = rope_interleaved_pairs(query, *rotary_emb)
        key = rope_interleaved_pairs(key, *rotary_emb)
    return query, key, value


def liveditor_gate(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """LIVEditor's per-token residual gate of one self-attention layer.

    Args:
        attn: the layer's ``WanAttention`` carrying ``alpha_1`` (``Linear(dim, 1, bias=False)``).
        hidden_states: [B, N, dim], the self-attention's input (normed, modulated hidden states).

    Returns:
        [B, N, 1] float32, ``(sigmoid(alpha_1(hidden_states)) - 0.5) * 0.5``, in [-0.25, 0.25].

    Raises:
        TypeError: ``attn`` has no ``alpha_1`` (not a LIVEditor self-attention layer).

    Example:
        >>> g = liveditor_gate(model.blocks[0].attn1, x)   # x: [1, 65520, 5120] -> [1, 65520, 1]
    """
    alpha = getattr(attn, "alpha_1", None)
    if not isinstance(alpha, torch.nn.Module):
        raise TypeError(f"{type(attn).__name__} has no alpha_1 gate: not a LIVEditor self-attention layer")
    return (torch.sigmoid(alpha(hidden_states).float()) - 0.5) * 0.5
