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
        wan_icl_pipe=tiny_wan_icl_pipe,
        source_video=source_video,
    )


def tiny_wan_icl_pipe(two_experts=False):
    """A tiny WanInContextEditPipeline: random UMT5 + byte tokenizer, tiny VAE, head_dim 32 transformer."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from isa_plugin.pipelines import WanInContextEditPipeline

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False,
        )
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    transformer = tiny_wan(in_channels=16, out_channels=16, text_dim=32)
    transformer_2 = tiny_wan(in_channels=16, out_channels=16, text_dim=32) if two_experts else None
    return WanInContextEditPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two_experts else None,
    )


def source_video(frames=9, size=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, size, size, generator=g)  # [F, C, H, W] in [0, 1]
