"""Flux family (Kontext): exactness, ISA on the joint attention, removal, state_dict, layout, the pipeline."""

import inspect

import numpy as np
import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.adapters import apply_isa, isa_processors, remove_isa, stats
from isa_plugin.adapters.flux import FluxISAAttnProcessor, flux_layout, image_id_spans

diffusers = pytest.importorskip("diffusers")

EXACT = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=8)
SPARSE = ISAConfig(block_size=8)
TEXT, TGT_HW, CTX_HW = 8, (8, 8), (8, 12)  # 8 text tokens, 64 target tokens, 96 context tokens


def tiny_flux(num_layers=2, num_single_layers=2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[8, 12, 12],
    ).eval()


def _ids(h, w, marker):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = marker
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def kontext_inputs(batch=1, context=True):
    g = torch.Generator().manual_seed(1)
    ids = [_ids(*TGT_HW, 0)] + ([_ids(*CTX_HW, 1)] if context else [])
    img_ids = torch.cat(ids)
    return dict(
        hidden_states=torch.randn(batch, img_ids.shape[0], 16, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT, 3),
    )


def _fwd(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


def test_processor_signature_matches_stock():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert list(inspect.signature(FluxISAAttnProcessor.__call__).parameters) == list(
        inspect.signature(FluxAttnProcessor.__call__).parameters
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_all_ratios_one_equals_stock(batch):
    t = tiny_flux()
    x = kontext_inputs(batch)
    ref = _fwd(t, x)
    apply_isa(t, EXACT)
    out = _fwd(t, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert list(stats(t)) == LAYERS
    assert all(s == {"isa_calls": 1, "fallbacks": 0, "reasons": {}, "backends": {"reference": 1}} for s in stats(t).values())


def test_fused_projections_equal_stock():
    from diffusers.models.attention import AttentionModuleMixin

    t = tiny_flux(1, 1)
    for m in t.modules():
        if isinstance(m, AttentionModuleMixin):
            m.fuse_projections()
    x = kontext_inputs()
    ref = _fwd(t, x)
    apply_isa(t, EXACT)
    assert (_fwd(t, x) - ref).abs().max().item() <= 1e-5
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


def test_dense_layers_reproduce_stock_bitwise():
    """Layers left dense run the processor's own copy of the stock computation: bit-identical output."""
    t = tiny_flux()
    x = kontext_inputs()
    ref = _fwd(t, x)
    apply_isa(t, {n: None for n in LAYERS})
    assert torch.equal(_fwd(t, x), ref)
    assert all(s["reasons"] == {"layer left dense (no config)": 1} for s in stats(t).values())


def test_default_ratios_use_isa_then_remove_restores():
    t = tiny_flux()
    x = kontext_inputs()
    ref = _fwd(t, x)
    before = t.attn_processors
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    apply_isa(t, SPARSE)
    out = _fwd(t, x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(s == {"isa_calls": 1, "fallbacks": 0, "reasons": {}, "backends": {"reference": 1}} for s in stats(t).values())
    assert all(isinstance(p, FluxISAAttnProcessor) for p in t.attn_processors.values())
    assert t.state_dict().keys() == sd.keys() and all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())
    remove_isa(t)
    assert all(p is before[k] for k, p in t.attn_processors.items())
    assert torch.equal(_fwd(t, x), ref)


def test_text_to_image_call_runs_dense():
    t = tiny_flux(1, 1)
    x = kontext_inputs(context=False)
    ref = _fwd(t, x)
    apply_isa(t, SPARSE)
    assert torch.equal(_fwd(t, x), ref)
    assert all(s["isa_calls"] == 0 and "no context tokens (not an in-context call)" in s["reasons"] for s in stats(t).values())


def test_layout_from_image_ids():
    x = kontext_inputs()
    assert flux_layout(x["encoder_hidden_states"], x["hidden_states"], x["img_ids"]) == Layout(
        [("text", 8), ("target", 64), ("context", 96)]
    )
    ids = torch.cat([_ids(2, 2, 1), _ids(3, 3, 0), _ids(1, 5, 2)])
    assert image_id_spans(ids) == [("context", 4), ("target", 9), ("context", 5)]
    assert image_id_spans(ids[None]) == image_id_spans(ids)  # deprecated 3-D ids
    assert flux_layout(x["encoder_hidden_states"], x["hidden_states"][:, :10], x["img_ids"]) is None


def tiny_kontext_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux(),
    )


@pytest.mark.slow
def test_kontext_pipeline_end_to_end():
    from PIL import Image

    pipe = tiny_kontext_pipe()
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((32, 48, 3)) * 255).astype("uint8"))  # context: 32x48 px
    g = torch.Generator().manual_seed(3)
    emb = dict(prompt_embeds=torch.randn(1, TEXT, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    neg = dict(negative_prompt_embeds=torch.randn(1, TEXT, 32, generator=g), negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))

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
    apply_isa(pipe, EXACT)
    out, _ = run()
    assert (out - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)

    apply_isa(pipe, SPARSE)
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
    expected = Layout([("text", TEXT), ("target", n_target), ("context", n_context)])
    assert len(seen) == len(LAYERS) * 2 * 2  # layers x steps x (cond, uncond)
    assert all(layout == expected and n == expected.num_tokens for _, n, layout in seen)
    # the image stream is [noisy; context]: the context part is the same clean latents at every step
    assert torch.equal(inputs[0][:, n_target:], inputs[-1][:, n_target:])
    assert not torch.equal(inputs[0][:, :n_target], inputs[-1][:, :n_target])
    assert all(s == {"isa_calls": 4, "fallbacks": 0, "reasons": {}, "backends": {"reference": 4}} for s in stats(pipe).values())
    remove_isa(pipe)


def test_registered():
    from isa_plugin.adapters import registered_families, registered_pipelines

    assert registered_families()["FluxTransformer2DModel"].name == "flux"
    for name in ("FluxKontextPipeline", "FluxKontextInpaintPipeline"):
        assert name in registered_pipelines() and hasattr(diffusers, name)


def test_observe_attention_is_stock_and_sees_layouts():
    from isa_plugin.adapters import is_isa_applied, observe_attention

    t = tiny_flux()
    x = kontext_inputs()
    ref = _fwd(t, x)
    before = t.attn_processors
    seen = []
    with observe_attention(t, lambda name, q, k, v, layout, step: seen.append((name, q.shape, layout))):
        out = _fwd(t, x)
    assert torch.equal(out, ref)
    expected = Layout([("text", TEXT), ("target", 64), ("context", 96)])
    assert [n for n, _, _ in seen] == LAYERS
    assert all(shape == (1, 168, 2, 32) and layout == expected for _, shape, layout in seen)
    assert not is_isa_applied(t) and all(p is before[k] for k, p in t.attn_processors.items())
