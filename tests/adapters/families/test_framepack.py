"""HunyuanVideo-Framepack family: packed-sequence layout, mask analysis, observation, the pipeline.

The family contract (signatures, exactness with text masks, dense layers, refiner untouched, removal) is
checked in test_family_contract.py.
"""

import numpy as np
import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, isa_processors, remove_isa, stats
from isa_plugin.adapters.families.framepack import FramepackLayout, framepack_video_spans
from isa_plugin.pipelines.tiny import build_tiny_pipeline
from rel_helpers import counters

diffusers = pytest.importorskip("diffusers")

LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


@pytest.mark.parametrize("size", [8, 10])
def test_layout_matches_packed_sequence(tiny, size):
    """Spans from the arguments (history embedders pad to their kernels) match what the blocks see."""
    t = tiny.framepack(1, 1)
    x = tiny.framepack_inputs(size=size)
    c = lambda a, b: -(-a // b)  # noqa: E731
    h = size // 2
    expected = [
        ("context", c(16, 4) * c(size, 8) ** 2),
        ("context", c(2, 2) * c(size, 4) ** 2),
        ("context", 2 * h * h),
        ("target", 3 * h * h),
    ]
    assert framepack_video_spans(t, x) == expected
    apply_isa(t, tiny.SPARSE)
    seen = []
    for p in isa_processors(t).values():
        p.observer = lambda name, q, k, v, layout, step: seen.append((q.shape[1], layout))
    tiny.fwd(t, x)
    assert len(seen) == 2
    for n, layout in seen:
        assert layout == Layout(expected + [("text", tiny.FRAMEPACK_IMAGE_TOKENS + tiny.FRAMEPACK_TEXT)]) and n == layout.num_tokens
    assert FramepackLayout(expected)(sum(n for _, n in expected)) == Layout(expected)
    assert FramepackLayout(expected)(10) is None


@pytest.mark.slow
def test_pipeline_end_to_end(tiny):
    from PIL import Image

    pipe = build_tiny_pipeline("framepack", layers=2, single_layers=2)  # the LAYERS above
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(1, tiny.FRAMEPACK_TEXT)
    mask[0, 6:] = 0  # padded prompt: the transformer trims it (batch 1)
    kw = dict(
        image=image, prompt_embeds=torch.randn(1, tiny.FRAMEPACK_TEXT, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
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
    apply_isa(pipe, tiny.EXACT)
    out, _ = run()
    assert (out - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)

    apply_isa(pipe, tiny.SPARSE)
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
        ("text", tiny.FRAMEPACK_IMAGE_TOKENS + 6),
    ])
    assert len(seen) == len(LAYERS) * 2
    assert all(layout == expected and n == expected.num_tokens for n, layout in seen)
    assert all(s == counters(2) for s in stats(pipe).values())
    remove_isa(pipe)


def test_registered():
    from isa_plugin.adapters import registered_families, registered_pipelines

    assert registered_families()["HunyuanVideoFramepackTransformer3DModel"].name == "framepack"
    for name in ("HunyuanVideoFramepackPipeline",):
        assert name in registered_pipelines() and hasattr(diffusers, name)


def test_mask_analysed_once_per_forward(tiny, monkeypatch):
    import isa_plugin.adapters.masking as q

    calls = []
    real = q._key_mask_plan
    monkeypatch.setattr(q, "_key_mask_plan", lambda *a: calls.append(1) or real(*a))
    t = tiny.framepack()
    x = tiny.framepack_inputs(2, text_valid=[8, 3])
    apply_isa(t, tiny.SPARSE)
    tiny.fwd(t, x)
    tiny.fwd(t, x)
    assert len(calls) == 2  # one per transformer call, shared by its 4 layers
    assert all(s == counters(2) for s in stats(t).values())


def test_observe_attention_is_stock_and_sees_layouts(tiny):
    from isa_plugin.adapters import is_isa_applied, observe_attention

    t = tiny.framepack()
    x = tiny.framepack_inputs()
    ref = tiny.fwd(t, x)
    before = tiny.processors(t)
    seen = []
    with observe_attention(t, lambda name, q, k, v, layout, step: seen.append((name, q.shape[1], layout))):
        out = tiny.fwd(t, x)
    assert torch.equal(out, ref)
    assert [n for n, _, _ in seen] == LAYERS
    assert all(layout is not None and layout.num_tokens == n and layout.num("text") == tiny.FRAMEPACK_IMAGE_TOKENS + tiny.FRAMEPACK_TEXT for _, n, layout in seen)
    assert not is_isa_applied(t) and all(p is before[n] for n, p in tiny.processors(t).items())


@pytest.mark.parametrize("size", [8, 10])
def test_spans_are_where_the_transformer_packs_each_stream(tiny, size):
    """The packed video sequence entering the first block is [4x; 2x; clean; noisy], with our span lengths."""
    t = tiny.framepack(1, 1)
    x = tiny.framepack_inputs(size=size)
    packed = []
    t.transformer_blocks[0].register_forward_pre_hook(lambda m, args: packed.append(args[0]))
    tiny.fwd(t, x)
    with torch.no_grad():
        clean, h2, h4 = t.clean_x_embedder(x["latents_clean"], x["latents_history_2x"], x["latents_history_4x"])
        noisy = t.x_embedder(x["hidden_states"])
    spans = framepack_video_spans(t, x)
    parts = torch.split(packed[0], [n for _, n in spans], dim=1)
    for part, stream in zip(parts, (h4, h2, clean, noisy)):
        assert torch.equal(part, stream)
