"""Flux family (Kontext): fused projections, text-to-image calls, layout from image ids, the Kontext pipeline.

The family contract (signatures, exactness, dense layers, removal) is checked in test_family_contract.py.
"""

import numpy as np
import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, isa_processors, remove_isa, stats
from isa_plugin.adapters.families.flux import flux_layout, image_id_spans
from isa_plugin.pipelines.tiny import build_tiny_pipeline
from rel_helpers import counters

diffusers = pytest.importorskip("diffusers")



LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


def test_fused_projections_equal_stock(tiny):
    from diffusers.models.attention import AttentionModuleMixin

    t = tiny.flux(1, 1)
    for m in t.modules():
        if isinstance(m, AttentionModuleMixin):
            m.fuse_projections()
    x = tiny.flux_inputs()
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.EXACT)
    assert (tiny.fwd(t, x) - ref).abs().max().item() <= 1e-5
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


def test_text_to_image_call_runs_dense(tiny):
    t = tiny.flux(1, 1)
    x = tiny.flux_inputs(context=False)
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.SPARSE)
    assert torch.equal(tiny.fwd(t, x), ref)
    assert all(s["isa_calls"] == 0 and "no context tokens (not an in-context call)" in s["reasons"] for s in stats(t).values())


def test_layout_from_image_ids(tiny):
    x = tiny.flux_inputs()
    assert flux_layout(x["encoder_hidden_states"], x["hidden_states"], x["img_ids"]) == Layout(
        [("text", 8), ("target", 64), ("context", 96)]
    )
    ids = torch.cat([tiny.flux_ids(2, 2, 1), tiny.flux_ids(3, 3, 0), tiny.flux_ids(1, 5, 2)])
    assert image_id_spans(ids) == [("context", 4), ("target", 9), ("context", 5)]
    assert image_id_spans(ids[None]) == image_id_spans(ids)  # deprecated 3-D ids
    assert flux_layout(x["encoder_hidden_states"], x["hidden_states"][:, :10], x["img_ids"]) is None


@pytest.mark.slow
def test_kontext_pipeline_end_to_end(tiny):
    from PIL import Image

    pipe = build_tiny_pipeline("flux", layers=2, single_layers=2)  # the LAYERS above
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((32, 48, 3)) * 255).astype("uint8"))  # context: 32x48 px
    g = torch.Generator().manual_seed(3)
    emb = dict(prompt_embeds=torch.randn(1, tiny.FLUX_TEXT, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    neg = dict(negative_prompt_embeds=torch.randn(1, tiny.FLUX_TEXT, 32, generator=g), negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))

    def run(**extra):
        latents = []

        def grab(p, i, t, kw):
            latents.append(kw["latents"])
            return {}

        out = pipe(
            image=image, height=32, width=32, max_area=32 * 32, _auto_resize=False, num_inference_steps=2,
            guidance_scale=2.0, true_cfg_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt",
            callback_on_step_end=grab, **emb, **neg, **extra,
        ).images
        return out, latents

    ref, ref_latents = run()
    apply_isa(pipe, tiny.EXACT)
    out, _ = run()
    assert (out - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)

    apply_isa(pipe, tiny.SPARSE)
    seen, inputs = [], []
    for p in isa_processors(pipe).values():
        p.observer = lambda name, q, k, v, layout, step: seen.append((name, q.shape[1], layout))
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    out, latents = run()
    hook.remove()
    assert torch.isfinite(out).all()
    # the pipeline's own latents: [B, (32/2/2)^2 packed target tokens, C]; context from the 32x48 image
    n_target = latents[0].shape[1]
    vsf = pipe.vae_scale_factor
    n_context = (32 // vsf // 2) * (48 // vsf // 2)
    assert (n_target, n_context) == (64, 96)
    expected = Layout([("text", tiny.FLUX_TEXT), ("target", n_target), ("context", n_context)])
    assert len(seen) == len(LAYERS) * 2 * 2  # layers x steps x (cond, uncond)
    assert all(layout == expected and n == expected.num_tokens for _, n, layout in seen)
    # the image stream is [noisy; context]: the context part is the same clean latents at every step
    assert torch.equal(inputs[0][:, n_target:], inputs[-1][:, n_target:])
    assert not torch.equal(inputs[0][:, :n_target], inputs[-1][:, :n_target])
    assert all(s == counters(4) for s in stats(pipe).values())
    remove_isa(pipe)


def test_registered():
    from isa_plugin.adapters import registered_families, registered_pipelines

    assert registered_families()["FluxTransformer2DModel"].name == "flux"
    for name in ("FluxKontextPipeline", "FluxKontextInpaintPipeline"):
        assert name in registered_pipelines() and hasattr(diffusers, name)


def test_observe_attention_is_stock_and_sees_layouts(tiny):
    from isa_plugin.adapters import is_isa_applied, observe_attention

    t = tiny.flux()
    x = tiny.flux_inputs()
    ref = tiny.fwd(t, x)
    before = t.attn_processors
    seen = []
    with observe_attention(t, lambda name, q, k, v, layout, step: seen.append((name, q.shape, layout))):
        out = tiny.fwd(t, x)
    assert torch.equal(out, ref)
    expected = Layout([("text", tiny.FLUX_TEXT), ("target", 64), ("context", 96)])
    assert [n for n, _, _ in seen] == LAYERS
    assert all(shape == (1, 168, 2, 32) and layout == expected for _, shape, layout in seen)
    assert not is_isa_applied(t) and all(p is before[k] for k, p in t.attn_processors.items())
