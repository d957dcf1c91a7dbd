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
        ltx=tiny_ltx,
        ltx_inputs=ltx_inputs,
        ltx_condition_pipe=tiny_ltx_condition_pipe,
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


def tiny_ltx(num_layers=2, in_channels=8, caption_channels=16):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=num_layers, qk_norm="rms_norm_across_heads", caption_channels=caption_channels,
    ).eval()


def ltx_inputs(frames=3, h=4, w=8, prefix_frames=0, batch=1, channels=8, caption_channels=16):
    """Packed LTX inputs; with ``prefix_frames`` > 0, condition tokens at frame coordinate > 0 are prepended."""
    g = torch.Generator().manual_seed(3)
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1).float()
    grid[0] = (grid[0] * 8 + 1 - 8).clamp(min=0)
    parts = []
    if prefix_frames:
        pre = torch.stack(torch.meshgrid(torch.arange(prefix_frames), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1).float()
        pre[0] = (pre[0] * 8 + 1 - 8).clamp(min=0) + 8  # a condition at frame_index 8
        parts.append(pre)
    coords = torch.cat(parts + [grid], dim=1)[None].repeat(batch, 1, 1)
    coords[:, 0] /= 25.0
    S = coords.shape[-1]
    return dict(
        hidden_states=torch.randn(batch, S, channels, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, caption_channels, generator=g),
        timestep=torch.full((batch, 1), 500.0),
        encoder_attention_mask=torch.ones(batch, 6),
        video_coords=coords,
    )


def tiny_ltx_condition_pipe():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    ).eval()
    return LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=ByT5Tokenizer(),
        transformer=tiny_ltx(in_channels=8, caption_channels=32),
    )
