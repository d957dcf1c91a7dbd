"""Rotary position embeddings as the stock diffusers processors apply them, one function per convention.

Each ISA processor must reproduce its stock processor exactly, RoPE included; the conventions differ by
family (which channels rotate together, before or after splitting heads). The ones diffusers exposes as
functions are called through thin wrappers so that diffusers is imported only when a processor runs. Wan's
convention (consecutive channel pairs) is the model's own math, shared with the package's Wan-based models:
:func:`isa_plugin.pipelines.wan_attention.rope_interleaved_pairs`.
"""

from __future__ import annotations

import torch

__all__ = ["rope_interleaved_channels", "rope_split_halves", "rope_diffusers", "rope_qwen"]


def rope_interleaved_channels(x: torch.Tensor, freqs) -> torch.Tensor:
    """RoPE on [B, S, C] with (cos, sin) [B, S, C]: channel pairs (2i, 2i+1) rotate together (LTX, LTX-2)."""
    cos, sin = freqs
    re, im = x.unflatten(2, (-1, 2)).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_split_halves(x: torch.Tensor, freqs) -> torch.Tensor:
    """LTX-2 "split" RoPE: per head, the first and second halves of the channels rotate together.

    ``x`` is [B, S, H·D] (with cos/sin [B, H, S, D/2]) or already per head with matching cos/sin.
    """
    cos, sin = freqs
    dtype = x.dtype
    reshaped = x.ndim != 4 and cos.ndim == 4
    if reshaped:
        b, h, t, _ = cos.shape
        x = x.reshape(b, t, h, -1).swapaxes(1, 2)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"split RoPE needs an even channel count, got {d}")
    halves = x.reshape(*x.shape[:-1], 2, d // 2).float()
    first, second = halves[..., :1, :], halves[..., 1:, :]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = halves * c
    out[..., :1, :].addcmul_(-s, second)
    out[..., 1:, :].addcmul_(s, first)
    out = out.reshape(*out.shape[:-2], d)
    if reshaped:
        out = out.swapaxes(1, 2).reshape(b, t, -1)
    return out.to(dtype)


def rope_diffusers(x: torch.Tensor, freqs) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` on [B, S, H, D] (Flux, HunyuanVideo-Framepack)."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


def rope_qwen(x: torch.Tensor, freqs) -> torch.Tensor:
    """QwenImage's complex-form RoPE on [B, S, H, D]."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(x, freqs, use_real=False)
