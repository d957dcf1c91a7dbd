"""Randomly initialised transformers of a given shape for the GPU benchmarks (no weights are read)."""

from __future__ import annotations

import argparse

import torch


def add_wan_shape_args(ap: argparse.ArgumentParser, *, layers: int) -> None:
    """The Wan-14B shape options the LIVEditor benchmarks share (defaults: 40 heads x 128, ffn 13,824, text
    width 4,096, 512 text tokens, batch 2, a 60 x 104 latent grid) and their layer count."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=60, help="latent height (before the 2x2 patch)")
    ap.add_argument("--width", type=int, default=104, help="latent width (before the 2x2 patch)")


def rel_l2(a, b) -> float:
    """Relative L2 distance of ``a`` to ``b``."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rel_l1(a, b) -> float:
    """Relative L1 distance of ``a`` to ``b`` (mean absolute difference over mean absolute value of ``b``)."""
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


def build_random_transformer(cls, *, device, dtype, **config):
    """``cls(**config)`` with random weights created directly in ``dtype`` on ``device``.

    As ``from_pretrained(torch_dtype=...)`` does, the model's ``_keep_in_fp32_modules`` stay in float32.
    Creating the weights in ``dtype`` avoids a float32 copy of a many-billion-parameter model.
    """
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(prev)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep & set(name.split(".")):
                p.data = p.data.float()
    return model.eval().requires_grad_(False)


def build_wan_transformer(*, heads: int, head_dim: int, ffn: int, layers: int, text_dim: int, device, dtype, model_cls=None):
    """``WanTransformer3DModel`` (or ``model_cls``, a subclass taking its config, e.g. LIVEditor's) with random
    weights (Wan 14B: 40 heads x 128, ffn 13824, 40 layers, text 4096)."""
    from diffusers import WanTransformer3DModel

    return build_random_transformer(
        model_cls or WanTransformer3DModel, device=device, dtype=dtype,
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def build_ltx2_transformer(*, heads: int, head_dim: int, audio_heads: int, audio_head_dim: int, layers: int, text_dim: int,
                           device, dtype):
    """``LTX2VideoTransformer3DModel`` with random weights.

    LTX-2 (diffusers' defaults): 32 heads x 128 (video), 32 x 64 (audio), 48 layers, 128 latent channels for
    video and audio, caption channels 3840, interleaved RoPE, cross-attention widths equal to the inner widths.
    """
    from diffusers import LTX2VideoTransformer3DModel

    return build_random_transformer(
        LTX2VideoTransformer3DModel, device=device, dtype=dtype,
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, audio_in_channels=128, audio_out_channels=128,
        audio_num_attention_heads=audio_heads, audio_attention_head_dim=audio_head_dim,
        audio_cross_attention_dim=audio_heads * audio_head_dim, num_layers=layers, caption_channels=text_dim,
        qk_norm="rms_norm_across_heads", rope_type="interleaved",
    )
