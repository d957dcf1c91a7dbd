"""Tiny random diffusers models for the adapter tests (offline, CPU, head_dim 32), and the shared helpers.

Tests reach everything here through the ``tiny`` fixture: ``tiny.<family>(...)`` builds a tiny transformer,
``tiny.<family>_inputs(...)`` its forward arguments, ``tiny.fwd`` runs a forward, ``tiny.processors`` lists
the attention processors. Whole pipelines (``tiny.wan_icl_pipe``, ``tiny.ltx_condition_pipe``,
``tiny.ltx2_ic_pipe``) come from :mod:`isa_plugin.pipelines.tiny`, the one builder of tiny pipelines.
"""

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


def fwd(model, inputs, *, all_outputs=False):
    """One forward without grad: the first output, or with ``all_outputs`` the tuple of every output."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    return tuple(out) if all_outputs else out[0]


def processors(model):
    """Module path -> attention processor, for every attention module of ``model`` (ISA's or stock)."""
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "get_processor")}


@pytest.fixture
def tiny():
    """Builders of tiny models and inputs, and the shared helpers (conftest is reached through this fixture)."""
    import types

    return types.SimpleNamespace(
        EXACT=EXACT,
        SPARSE=SPARSE,
        fwd=fwd,
        processors=processors,
        wan=tiny_wan,
        wan_inputs=wan_inputs,
        wan_icl_pipe=tiny_wan_icl_pipe,
        source_video=source_video,
        ltx=tiny_ltx,
        ltx_inputs=ltx_inputs,
        ltx_condition_pipe=tiny_ltx_condition_pipe,
        ltx2=tiny_ltx2,
        ltx2_inputs=ltx2_inputs,
        ltx2_ic_pipe=tiny_ltx2_ic_pipe,
        flux=tiny_flux,
        flux_inputs=flux_inputs,
        flux_ids=flux_ids,
        FLUX_TEXT=FLUX_TEXT,
        framepack=tiny_framepack,
        framepack_inputs=framepack_inputs,
        FRAMEPACK_TEXT=FRAMEPACK_TEXT,
        FRAMEPACK_IMAGE_TOKENS=FRAMEPACK_IMAGE_TOKENS,
        qwen=tiny_qwen,
        qwen_inputs=qwen_inputs,
        QWEN_TEXT=QWEN_TEXT,
        QWEN_SHAPES=QWEN_SHAPES,
        liveditor=tiny_liveditor,
        liveditor_inputs=liveditor_inputs,
    )


def tiny_wan_icl_pipe(two_experts=False):
    """A tiny WanInContextEditPipeline (``isa_plugin.pipelines.tiny``): random UMT5 + byte tokenizer, tiny VAE, head_dim 32."""
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    return build_tiny_pipeline("wan", two_experts=two_experts)


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
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    return build_tiny_pipeline("ltx")


def tiny_ltx2(num_layers=2, caption_channels=16, rope_type="interleaved", perturbed_attn=False, gated_attn=False):
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=num_layers, qk_norm="rms_norm_across_heads",
        caption_channels=caption_channels, rope_double_precision=False, rope_type=rope_type,
        perturbed_attn=perturbed_attn, gated_attn=gated_attn,
    ).eval()


def ltx2_inputs(frames=3, h=4, w=8, extra_tokens=0, batch=1, caption_channels=16, audio_frames=5):
    """LTX-2 transformer inputs; ``extra_tokens`` context tokens are appended after the F*H*W noisy tokens."""
    g = torch.Generator().manual_seed(4)
    S = frames * h * w + extra_tokens
    return dict(
        hidden_states=torch.randn(batch, S, 4, generator=g),
        audio_hidden_states=torch.randn(batch, audio_frames, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, caption_channels, generator=g),
        audio_encoder_hidden_states=torch.randn(batch, 6, caption_channels, generator=g),
        timestep=torch.full((batch,), 500.0),
        audio_timestep=torch.full((batch,), 500.0),
        encoder_attention_mask=torch.ones(batch, 6),
        audio_encoder_attention_mask=torch.ones(batch, 6),
        num_frames=frames,
        height=h,
        width=w,
        audio_num_frames=audio_frames,
        **({"video_coords": _ltx2_coords(frames, h, w, extra_tokens, batch)} if extra_tokens else {}),
    )


def _ltx2_coords(frames, h, w, extra, batch):
    """[B, 3, S, 2] pixel-space patch bounds: the noisy grid, then ``extra`` reference tokens on the same grid."""
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1).float()
    ref = grid[:, : extra % grid.shape[1] or grid.shape[1]] if extra <= grid.shape[1] else grid.repeat(1, extra // grid.shape[1] + 1)[:, :extra]
    c = torch.cat([grid, ref[:, :extra]], dim=1)
    c = torch.stack([c, c + 1], dim=-1) * torch.tensor([8.0, 32.0, 32.0]).view(3, 1, 1)
    c[0] = (c[0] + 1 - 8).clamp(min=0) / 24.0
    return c[None].repeat(batch, 1, 1, 1)


def tiny_ltx2_ic_pipe():
    """A tiny LTX2InContextPipeline (``isa_plugin.pipelines.tiny``): no text encoder, head_dim 32, a 2x VAE."""
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    return build_tiny_pipeline("ltx2", vae_compression=2)


# ----------------------------------------------------------------------------- Flux (Kontext)
FLUX_TEXT = 8  # text tokens; the image stream is a 8x8 target (64 tokens) then a 8x12 context (96 tokens)


def tiny_flux(num_layers=2, num_single_layers=2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[8, 12, 12],
    ).eval()


def flux_ids(h, w, marker):
    """Kontext image ids of an ``h`` x ``w`` grid: [marker, row, column] per token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = marker
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(batch=1, context=True):
    g = torch.Generator().manual_seed(1)
    ids = [flux_ids(8, 8, 0)] + ([flux_ids(8, 12, 1)] if context else [])
    img_ids = torch.cat(ids)
    return dict(
        hidden_states=torch.randn(batch, img_ids.shape[0], 16, generator=g),
        encoder_hidden_states=torch.randn(batch, FLUX_TEXT, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(FLUX_TEXT, 3),
    )


# ----------------------------------------------------------------------------- HunyuanVideo-Framepack
FRAMEPACK_TEXT, FRAMEPACK_IMAGE_TOKENS = 8, 16


def tiny_framepack(num_layers=2, num_single_layers=2):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12), image_condition_type=None,
        has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()


def framepack_inputs(batch=1, size=8, text_valid=None):
    """Inputs as the pipeline builds them: 3 noisy frames, clean 2, history 2x 2 frames, 4x 16 frames.

    ``text_valid``: per batch entry, the number of unpadded text tokens (None: all valid).
    """
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, FRAMEPACK_TEXT)
    for i, n in enumerate(text_valid or []):
        mask[i, n:] = 0
    lat = lambda f: torch.randn(batch, 4, f, size, size, generator=g)  # noqa: E731
    return dict(
        hidden_states=lat(3), timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, FRAMEPACK_TEXT, 16, generator=g),
        encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=g),
        image_embeds=torch.randn(batch, FRAMEPACK_IMAGE_TOKENS, 16, generator=g), indices_latents=torch.arange(3, 6),
        guidance=torch.full((batch,), 6000.0), latents_clean=lat(2), indices_latents_clean=torch.tensor([0, 6]),
        latents_history_2x=lat(2), indices_latents_history_2x=torch.arange(7, 9),
        latents_history_4x=lat(16), indices_latents_history_4x=torch.arange(9, 25),
    )


# ----------------------------------------------------------------------------- QwenImage (Edit)
QWEN_SHAPES = [(1, 8, 8), (1, 8, 12)]  # target 64 tokens, one condition image of 96 tokens
QWEN_TEXT = 12


def tiny_qwen(num_layers=2, **kw):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 12, 12), **kw,
    ).eval()


def qwen_inputs(batch=1, shapes=QWEN_SHAPES, text_valid=None):
    """``text_valid``: per batch entry, the number of unpadded text tokens (None: no mask)."""
    g = torch.Generator().manual_seed(1)
    S = sum(f * h * w for f, h, w in shapes)
    mask = None
    if text_valid is not None:
        mask = torch.zeros(batch, QWEN_TEXT, dtype=torch.long)
        for i, n in enumerate(text_valid):
            mask[i, :n] = 1
    return dict(
        hidden_states=torch.randn(batch, S, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, QWEN_TEXT, 16, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.5),
        img_shapes=[list(shapes)] * batch,
    )


# ----------------------------------------------------------------------------- LIVEditor
def tiny_liveditor(num_layers=2, **kw):
    """A tiny LIVEditorTransformer3DModel (its own processor: dense attention + the gated coarse residual).

    At this initialisation the gated residual moves the output by ~6e-3, far beyond the contract's 1e-5.
    """
    from isa_plugin.pipelines import LIVEditorTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(num_layers=num_layers, num_attention_heads=2, attention_head_dim=32, text_dim=16, ffn_dim=64, freq_dim=32)
    cfg.update(kw)
    return LIVEditorTransformer3DModel(**cfg).eval()


def liveditor_inputs(frames=3, source_frames=3, batch=1, h=8, w=14):
    """[target; source] inputs: 3 frames of 4 x 7 tokens each (84 + 84 tokens, ragged against 8 and 64)."""
    g = torch.Generator().manual_seed(5)
    return dict(
        hidden_states=torch.randn(batch, 16, frames, h, w, generator=g),
        timestep=torch.full((batch,), 600.0),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        source_latents=torch.randn(batch, 16, source_frames, h, w, generator=g),
    )
