"""Tiny random diffusers models for the adapter tests (offline, CPU, head_dim 32)."""

import pytest
import torch

from isa_plugin import ISAConfig

diffusers = pytest.importorskip("diffusers")

#: all ratios 1: ISA must equal dense attention
EXACT = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=8)
#: default ratios with blocks small enough for tiny sequences
SPARSE = ISAConfig(block_size=8)


def tiny_wan(num_layers=2, **kw):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    cfg.update(kw)
    return WanTransformer3DModel(**cfg).eval()


def wan_inputs(frames=6, batch=1, size=16, channels=4):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, channels, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
    )


@pytest.fixture
def wan():
    return tiny_wan()


@pytest.fixture
def tiny():
    """Builders of tiny models and inputs (conftest helpers are reached through this fixture)."""
    import types

    return types.SimpleNamespace(
        EXACT=EXACT,
        SPARSE=SPARSE,
        wan=tiny_wan,
        wan_inputs=wan_inputs,
    )
