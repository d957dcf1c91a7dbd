"""LTX-Video family: exactness, sparsity on attn1 only, removal, state_dict, LTXConditionPipeline layout."""

import numpy as np
import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats
from isa_plugin.adapters.ltx import LTXISAAttnProcessor, ltx_prefix_layout


def _fwd(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_signature_matches_stock():
    import inspect

    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    assert list(inspect.signature(LTXISAAttnProcessor.__call__).parameters) == list(
        inspect.signature(LTXVideoAttnProcessor.__call__).parameters
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_all_ratios_one_equals_stock(tiny, batch):
    t = tiny.ltx()
    x = tiny.ltx_inputs(frames=3, prefix_frames=2, batch=batch)
    ref = _fwd(t, x)
    apply_isa(t, tiny.EXACT)  # layout inferred from video_coords
    out = _fwd(t, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert all(s == {"isa_calls": 1, "fallbacks": 0, "reasons": {}, "backends": {"reference": 1}} for s in stats(t).values())


def test_default_ratios_self_attention_only_and_removal(tiny):
    t = tiny.ltx(num_layers=3)
    x = tiny.ltx_inputs(frames=3, prefix_frames=2)
    ref = _fwd(t, x)
    before = t.attn_processors
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    apply_isa(t, tiny.SPARSE)
    out = _fwd(t, x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert list(stats(t)) == [f"transformer_blocks.{i}.attn1" for i in range(3)]
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(t).values())
    for key, proc in t.attn_processors.items():
        if ".attn2." in key:
            assert proc is before[key] and type(proc).__name__ == "LTXVideoAttnProcessor"
        else:
            assert isinstance(proc, LTXISAAttnProcessor)
    assert t.state_dict().keys() == sd.keys() and all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())
    remove_isa(t)
    assert all(t.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(_fwd(t, x), ref)


def test_layout_inference():
    x = torch.zeros(1, 448, 8)
    coords = torch.zeros(1, 3, 448)
    coords[0, 0, :128] = 8.0 / 25
    assert ltx_prefix_layout(x, coords) == Layout([("context", 128), ("target", 320)])
    assert ltx_prefix_layout(x, torch.zeros(1, 3, 448)) == Layout([("target", 448)])
    assert ltx_prefix_layout(x, None) == Layout([("target", 448)])
    assert ltx_prefix_layout(x, torch.zeros(1, 3, 10)) is None
    assert ltx_prefix_layout(x, torch.ones(1, 3, 448)) is None


def test_plain_call_without_context_falls_back(tiny):
    t = tiny.ltx()
    x = tiny.ltx_inputs(frames=3)
    x.pop("video_coords")
    x.update(num_frames=3, height=4, width=8)
    ref = _fwd(t, x)
    apply_isa(t, tiny.SPARSE)
    assert torch.equal(_fwd(t, x), ref)
    assert all(s["reasons"] == {"no context tokens (not an in-context call)": 1} for s in stats(t).values())
    remove_isa(t)
    apply_isa(t, tiny.SPARSE, layout=Layout([("target", 64), ("context", 32)]))  # explicit layout overrides
    _fwd(t, x)
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


def _frames(n=9, size=32, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def test_condition_pipeline_end_to_end(tiny):
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    pipe = tiny.ltx_condition_pipe()
    pipe.set_progress_bar_config(disable=True)
    args = dict(conditions=[LTXVideoCondition(video=_frames(), frame_index=8)], prompt="a", negative_prompt="",
                height=32, width=32, num_frames=17, num_inference_steps=2, guidance_scale=3.0,
                output_type="latent", max_sequence_length=16)
    ref = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    apply_isa(pipe, tiny.SPARSE)
    seen, shapes = [], []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["hidden_states"].shape)), with_kwargs=True)
    with observe_attention(pipe, lambda n, q, k, v, layout, step: seen.append(layout), dense=False):
        out = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # the pipeline's own latent shapes: target tokens = F x H x W of the output latents; the rest are prefix tokens
    _, _, F, H, W = ref.shape
    S = shapes[0][1]
    assert S > F * H * W
    expected = Layout([("context", S - F * H * W), ("target", F * H * W)])
    assert seen and all(layout == expected for layout in seen)
    assert all(s["isa_calls"] == 2 and s["fallbacks"] == 0 for s in stats(pipe).values())  # CFG batched: 1 call/step
    remove_isa(pipe)
    apply_isa(pipe, tiny.EXACT)
    exact = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    assert (exact - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)
    assert torch.equal(pipe(**args, generator=torch.Generator().manual_seed(0)).frames, ref)
