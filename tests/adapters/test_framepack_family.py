"""HunyuanVideo-Framepack family: exactness, text masks (batch > 1), refiner untouched, removal, layout, the pipeline."""

import inspect

import numpy as np
import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.adapters import apply_isa, isa_processors, remove_isa, stats
from isa_plugin.adapters.framepack import FramepackISAAttnProcessor, FramepackLayout, framepack_video_spans

diffusers = pytest.importorskip("diffusers")

EXACT = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=8)
SPARSE = ISAConfig(block_size=8)
LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
REFINER = "context_embedder.token_refiner.refiner_blocks.0.attn"
IMAGE_TOKENS, TEXT = 16, 8


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
    """Inputs as the pipeline builds them: 3 noisy frames, clean 2, history 2x 2 frames, 4x 16 frames."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, TEXT)
    for i, n in enumerate(text_valid or []):
        mask[i, n:] = 0
    lat = lambda f: torch.randn(batch, 4, f, size, size, generator=g)  # noqa: E731
    return dict(
        hidden_states=lat(3), timestep=torch.full((batch,), 500), encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
        encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=g),
        image_embeds=torch.randn(batch, IMAGE_TOKENS, 16, generator=g), indices_latents=torch.arange(3, 6),
        guidance=torch.full((batch,), 6000.0), latents_clean=lat(2), indices_latents_clean=torch.tensor([0, 6]),
        latents_history_2x=lat(2), indices_latents_history_2x=torch.arange(7, 9),
        latents_history_4x=lat(16), indices_latents_history_4x=torch.arange(9, 25),
    )


def _fwd(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _processors(t):
    return {n: m.processor for n, m in t.named_modules() if hasattr(m, "get_processor")}


def test_processor_signature_matches_stock():
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    assert list(inspect.signature(FramepackISAAttnProcessor.__call__).parameters) == list(
        inspect.signature(HunyuanVideoAttnProcessor2_0.__call__).parameters
    )


@pytest.mark.parametrize("batch,text_valid", [(1, None), (2, None), (2, [8, 3]), (3, [5, 8, 1])])
def test_all_ratios_one_equals_stock(batch, text_valid):
    t = tiny_framepack()
    x = framepack_inputs(batch, text_valid=text_valid)
    ref = _fwd(t, x)
    apply_isa(t, EXACT)
    out = _fwd(t, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert list(stats(t)) == LAYERS
    assert all(s == {"isa_calls": 1, "fallbacks": 0, "reasons": {}, "backends": {"reference": 1}} for s in stats(t).values())


def test_dense_layers_reproduce_stock_bitwise():
    t = tiny_framepack()
    x = framepack_inputs(2, text_valid=[8, 3])
    ref = _fwd(t, x)
    apply_isa(t, {n: None for n in LAYERS})
    assert torch.equal(_fwd(t, x), ref)


def test_default_ratios_use_isa_refiner_untouched_then_remove_restores():
    t = tiny_framepack()
    x = framepack_inputs()
    ref = _fwd(t, x)
    before = _processors(t)
    assert type(before[REFINER]).__name__ == "AttnProcessor2_0"
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    apply_isa(t, SPARSE)
    out = _fwd(t, x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(s == {"isa_calls": 1, "fallbacks": 0, "reasons": {}, "backends": {"reference": 1}} for s in stats(t).values())
    after = _processors(t)
    assert after[REFINER] is before[REFINER]
    assert all(isinstance(after[n], FramepackISAAttnProcessor) for n in LAYERS)
    assert t.state_dict().keys() == sd.keys() and all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())
    remove_isa(t)
    assert all(p is before[n] for n, p in _processors(t).items())
    assert torch.equal(_fwd(t, x), ref)


@pytest.mark.parametrize("size", [8, 10])
def test_layout_matches_packed_sequence(size):
    """Spans from the arguments (history embedders pad to their kernels) match what the blocks see."""
    t = tiny_framepack(1, 1)
    x = framepack_inputs(size=size)
    c = lambda a, b: -(-a // b)  # noqa: E731
    h = size // 2
    expected = [
        ("context", c(16, 4) * c(size, 8) ** 2),
        ("context", c(2, 2) * c(size, 4) ** 2),
        ("context", 2 * h * h),
        ("target", 3 * h * h),
    ]
    assert framepack_video_spans(t, x) == expected
    apply_isa(t, SPARSE)
    seen = []
    for p in isa_processors(t).values():
        p.observer = lambda name, q, k, v, layout, step: seen.append((q.shape[1], layout))
    _fwd(t, x)
    assert len(seen) == 2
    for n, layout in seen:
        assert layout == Layout(expected + [("text", IMAGE_TOKENS + TEXT)]) and n == layout.num_tokens
    assert FramepackLayout(expected)(sum(n for _, n in expected)) == Layout(expected)
    assert FramepackLayout(expected)(10) is None


def tiny_framepack_pipe():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    encoder = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=16, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).eval()  # 16 image tokens
    return HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=tiny_framepack(), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=None, tokenizer_2=None, image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )


@pytest.mark.slow
def test_pipeline_end_to_end():
    from PIL import Image

    pipe = tiny_framepack_pipe()
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(1, TEXT)
    mask[0, 6:] = 0  # padded prompt: the transformer trims it (batch 1)
    kw = dict(
        image=image, prompt_embeds=torch.randn(1, TEXT, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        prompt_attention_mask=mask, height=64, width=64, num_frames=9, latent_window_size=3, num_inference_steps=2,
        output_type="pt",
    )

    def run():
        latents = []

        def grab(p, i, t, cb):
            latents.append(cb["latents"])
            return {}

        return pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=grab).frames, latents

    ref, _ = run()
    apply_isa(pipe, EXACT)
    out, _ = run()
    assert (out - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)

    apply_isa(pipe, SPARSE)
    seen = []
    for p in isa_processors(pipe).values():
        p.observer = lambda name, q, k, v, layout, step: seen.append((q.shape[1], layout))
    out, latents = run()
    assert torch.isfinite(out).all()
    # from the pipeline's own latents [B, C, F, H, W] and its history sizes [1 (+ prefix), 2, 16] (anti-drifting)
    _, _, F, H, W = latents[0].shape
    c = lambda a, b: -(-a // b)  # noqa: E731
    expected = Layout([
        ("context", c(16, 4) * c(H, 8) * c(W, 8)),
        ("context", c(2, 2) * c(H, 4) * c(W, 4)),
        ("context", 2 * (H // 2) * (W // 2)),
        ("target", F * (H // 2) * (W // 2)),
        ("text", IMAGE_TOKENS + 6),
    ])
    assert len(seen) == len(LAYERS) * 2
    assert all(layout == expected and n == expected.num_tokens for n, layout in seen)
    assert all(s == {"isa_calls": 2, "fallbacks": 0, "reasons": {}, "backends": {"reference": 2}} for s in stats(pipe).values())
    remove_isa(pipe)


def test_registered():
    from isa_plugin.adapters import registered_families, registered_pipelines

    assert registered_families()["HunyuanVideoFramepackTransformer3DModel"].name == "framepack"
    for name in ("HunyuanVideoFramepackPipeline",):
        assert name in registered_pipelines() and hasattr(diffusers, name)


def test_mask_analysed_once_per_forward(monkeypatch):
    import isa_plugin.adapters.masking as q

    calls = []
    real = q._key_mask_plan
    monkeypatch.setattr(q, "_key_mask_plan", lambda *a: calls.append(1) or real(*a))
    t = tiny_framepack()
    x = framepack_inputs(2, text_valid=[8, 3])
    apply_isa(t, SPARSE)
    _fwd(t, x)
    _fwd(t, x)
    assert len(calls) == 2  # one per transformer call, shared by its 4 layers
    assert all(s == {"isa_calls": 2, "fallbacks": 0, "reasons": {}, "backends": {"reference": 2}} for s in stats(t).values())


def test_observe_attention_is_stock_and_sees_layouts():
    from isa_plugin.adapters import is_isa_applied, observe_attention

    t = tiny_framepack()
    x = framepack_inputs()
    ref = _fwd(t, x)
    before = _processors(t)
    seen = []
    with observe_attention(t, lambda name, q, k, v, layout, step: seen.append((name, q.shape[1], layout))):
        out = _fwd(t, x)
    assert torch.equal(out, ref)
    assert [n for n, _, _ in seen] == LAYERS
    assert all(layout is not None and layout.num_tokens == n and layout.num("text") == IMAGE_TOKENS + TEXT for _, n, layout in seen)
    assert not is_isa_applied(t) and all(p is before[n] for n, p in _processors(t).items())


@pytest.mark.parametrize("size", [8, 10])
def test_spans_are_where_the_transformer_packs_each_stream(size):
    """The packed video sequence entering the first block is [4x; 2x; clean; noisy], with our span lengths."""
    t = tiny_framepack(1, 1)
    x = framepack_inputs(size=size)
    packed = []
    t.transformer_blocks[0].register_forward_pre_hook(lambda m, args: packed.append(args[0]))
    _fwd(t, x)
    with torch.no_grad():
        clean, h2, h4 = t.clean_x_embedder(x["latents_clean"], x["latents_history_2x"], x["latents_history_4x"])
        noisy = t.x_embedder(x["hidden_states"])
    spans = framepack_video_spans(t, x)
    parts = torch.split(packed[0], [n for _, n in spans], dim=1)
    for part, stream in zip(parts, (h4, h2, clean, noisy)):
        assert torch.equal(part, stream)
