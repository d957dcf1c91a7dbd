"""QwenImage family (Edit / EditPlus): text masks at the processor, layout, observation, the pipelines.

The family contract (signature, exactness with text masks and zero_cond_t, dense layers, removal) is checked
in test_family_contract.py.
"""

import inspect

import numpy as np
import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, isa_processors, remove_isa, stats
from isa_plugin.adapters.families.qwenimage import QwenImageISAAttnProcessor, qwen_image_layout
from isa_plugin.adapters.processor import attend_with_key_mask
from isa_plugin.pipelines.tiny import build_tiny_pipeline
from rel_helpers import counters

diffusers = pytest.importorskip("diffusers")

LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def _stock_and_isa_processor_outputs(tiny, config, text_valid):
    t = tiny.qwen(1)
    attn = t.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(5)
    B = len(text_valid)
    img = torch.randn(B, 160, attn.inner_dim, generator=g)
    txt = torch.randn(B, tiny.QWEN_TEXT, attn.inner_dim, generator=g)
    mask = torch.zeros(B, tiny.QWEN_TEXT, dtype=torch.bool)
    for i, n in enumerate(text_valid):
        mask[i, :n] = True
    rope = t.pos_embed([tiny.QWEN_SHAPES], max_txt_seq_len=tiny.QWEN_TEXT, device=img.device)
    with torch.no_grad():
        ref = attn(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, image_rotary_emb=rope)
        proc = QwenImageISAAttnProcessor(config, layout=Layout([("text", tiny.QWEN_TEXT), ("target", 64), ("context", 96)]), original=attn.processor)
        attn.set_processor(proc)
        out = attn(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, image_rotary_emb=rope)
    return ref, out, proc


def test_text_mask_is_honoured_including_padded_queries(tiny):
    """The processor alone (layout= given): image and text outputs, padded text queries included."""
    ref, out, proc = _stock_and_isa_processor_outputs(tiny, tiny.EXACT, [12, 7, 3])
    for r, o in zip(ref, out):
        assert (o - r).abs().max().item() <= 1e-5
    assert proc.stats.isa_calls == 1 and not proc.stats.fallbacks
    _, out, proc = _stock_and_isa_processor_outputs(tiny, tiny.SPARSE, [12, 7, 3])
    assert all(torch.isfinite(o).all() for o in out) and proc.stats.isa_calls == 1


def test_mask_on_non_text_tokens_falls_back(tiny):
    layout = Layout([("text", 8), ("target", 32), ("context", 32)])
    proc = QwenImageISAAttnProcessor(tiny.SPARSE, layout=layout)
    q, k, v = (torch.randn(1, 72, 2, 32) for _ in range(3))
    valid = torch.ones(1, 72, dtype=torch.bool)
    valid[0, 50] = False  # a context token
    sentinel = torch.zeros(1, 72, 2, 32)
    out = attend_with_key_mask(proc, q, k, v, valid, dense=lambda: sentinel)
    assert out is sentinel and dict(proc.stats.fallbacks) == {"attention mask on non-text tokens": 1}


def test_layout_from_img_shapes(tiny):
    x = tiny.qwen_inputs()
    assert qwen_image_layout(x["encoder_hidden_states"], x["hidden_states"], x["img_shapes"]) == Layout(
        [("text", tiny.QWEN_TEXT), ("target", 64), ("context", 96)]
    )
    hs = torch.zeros(1, 64 + 96 + 16, 4)
    two = [(1, 8, 8), (1, 8, 12), (1, 4, 4)]
    assert qwen_image_layout(x["encoder_hidden_states"], hs, [two]) == Layout(
        [("text", tiny.QWEN_TEXT), ("target", 64), ("context", 96), ("context", 16)]
    )
    assert qwen_image_layout(x["encoder_hidden_states"], hs, [tiny.QWEN_SHAPES]) is None  # does not add up
    # plain text-to-image: no condition image -> no context span -> the call runs dense
    t = tiny.qwen(1)
    y = tiny.qwen_inputs(shapes=[(1, 8, 8)])
    ref = tiny.fwd(t, y)
    apply_isa(t, tiny.SPARSE)
    assert torch.equal(tiny.fwd(t, y), ref)
    assert "no context tokens (not an in-context call)" in stats(t)["transformer_blocks.0.attn"]["reasons"]


@pytest.mark.slow
@pytest.mark.parametrize("cls_name", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_edit_pipelines_end_to_end(tiny, cls_name):
    from PIL import Image

    module = inspect.getmodule(getattr(diffusers, cls_name))
    pipe = build_tiny_pipeline("qwenimage", pipeline=cls_name)
    rng = np.random.default_rng(0)
    sizes = [(48, 32)] if cls_name == "QwenImageEditPipeline" else [(48, 32), (40, 40)]  # (width, height)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]
    g = torch.Generator().manual_seed(3)
    neg_mask = torch.ones(1, 8, dtype=torch.long)
    neg_mask[0, 6:] = 0  # the negative prompt is padded: its calls carry a text mask
    kw = dict(
        image=images[0] if len(images) == 1 else images, height=256, width=256, num_inference_steps=2,
        true_cfg_scale=2.0, prompt_embeds=torch.randn(1, 8, 16, generator=g), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=torch.randn(1, 8, 16, generator=g), negative_prompt_embeds_mask=neg_mask, output_type="pt",
    )

    def run():
        latents = []

        def grab(p, i, t, cb):
            latents.append(cb["latents"])
            return {}

        return pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=grab).images, latents

    if cls_name == "QwenImageEditPipeline":  # each run VAE-encodes ~1024^2 condition images: keep runs few
        ref, _ = run()
        apply_isa(pipe, tiny.EXACT)
        out, _ = run()
        assert (out - ref).abs().max().item() <= 1e-4
        remove_isa(pipe)

    apply_isa(pipe, tiny.SPARSE)
    seen, inputs = [], []
    for p in isa_processors(pipe).values():
        p.observer = lambda name, q, k, v, layout, step: seen.append((q.shape[1], layout))
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    out, latents = run()
    hook.remove()
    assert torch.isfinite(out).all()
    # expected spans from the pipeline's own latents (target) and its own condition-image sizing
    vsf = pipe.vae_scale_factor
    area = 1024 * 1024 if cls_name == "QwenImageEditPipeline" else module.VAE_IMAGE_SIZE
    contexts = []
    for w, h in sizes:
        cw, ch = module.calculate_dimensions(area, w / h)[:2]
        contexts.append((ch // vsf // 2) * (cw // vsf // 2))
    n_target = latents[0].shape[1]
    assert n_target == (256 // vsf // 2) ** 2
    expected = Layout([("text", 8), ("target", n_target)] + [("context", n) for n in contexts])
    assert len(seen) == len(LAYERS) * 2 * 2  # layers x steps x (cond, uncond)
    assert all(layout == expected and n == expected.num_tokens for n, layout in seen)
    # the image stream is [noisy; condition images]: the condition part is the same at every step
    assert torch.equal(inputs[0][:, n_target:], inputs[-1][:, n_target:])
    assert not torch.equal(inputs[0][:, :n_target], inputs[-1][:, :n_target])
    assert all(s == counters(4) for s in stats(pipe).values())
    remove_isa(pipe)


def test_registered():
    from isa_plugin.adapters import registered_families, registered_pipelines

    assert registered_families()["QwenImageTransformer2DModel"].name == "qwenimage"
    for name in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"):
        assert name in registered_pipelines() and hasattr(diffusers, name)


def test_observe_attention_is_stock_and_sees_layouts(tiny):
    from isa_plugin.adapters import is_isa_applied, observe_attention

    t = tiny.qwen()
    x = tiny.qwen_inputs(2, text_valid=[12, 5])
    ref = tiny.fwd(t, x)
    seen = []
    with observe_attention(t, lambda name, q, k, v, layout, step: seen.append((name, layout))):
        out = tiny.fwd(t, x)
    assert torch.equal(out, ref)
    assert seen == [(n, Layout([("text", tiny.QWEN_TEXT), ("target", 64), ("context", 96)])) for n in LAYERS]
    assert not is_isa_applied(t)
