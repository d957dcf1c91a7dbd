"""Tiny models and helpers shared by the reliability tests (CPU, offline, random weights)."""

import torch

from isa_plugin import ISAConfig

#: all ratios 1: ISA must equal dense attention
EXACT = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=8)
#: default-like sparse ratios with blocks small enough for tiny sequences
SPARSE = ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, block_size=8)


def tiny_wan(num_layers=2, heads=2, head_dim=32, seed=0):
    """A random WanTransformer3DModel (patch 1x2x2, 4 latent channels)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def wan_inputs(frames=4, batch=1, size=16, seed=1):
    """Transformer inputs: latents [B, 4, frames, size, size] (target + context frames), text, timestep."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
    )


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def qkv(B, N, H, D, seed=0, dtype=torch.float32, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(3)]




def counters(isa: int = 0, backend: str = "reference", fallbacks=None) -> dict:
    """A layer's ``isa_plugin.stats`` entry: ``isa`` calls served by ``backend``, dense fallbacks
    ``{reason: count}``, no plan reused."""
    fallbacks = dict(fallbacks or {})
    return {"isa_calls": isa, "fallbacks": sum(fallbacks.values()), "reasons": fallbacks,
            "backends": {backend: isa} if isa else {}, "reused_plans": 0}
