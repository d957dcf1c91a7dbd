"""Wan family: layout provider, attention_kwargs hints, bf16, compile, the in-context edit pipeline.

The family contract (signature, exactness, attn1 only, removal, state_dict) is checked in
test_family_contract.py.
"""

import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats
from isa_plugin.adapters.families.wan import WanICLLayout


def test_layout_provider_counts(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=5, size=16)  # 5 latent frames of 8x8/(2x2) = 64 tokens
    assert WanICLLayout(2)(t, x) == Layout([("target", 192), ("context", 128)])
    assert WanICLLayout(2, "before")(t, x) == Layout([("context", 128), ("target", 192)])
    assert WanICLLayout(5)(t, x) is None  # no target frame left
    with pytest.raises(ValueError):
        WanICLLayout(0)
    with pytest.raises(ValueError):
        WanICLLayout(2, "middle")


def test_layout_from_attention_kwargs(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.EXACT)
    out = tiny.fwd(t, {**x, "attention_kwargs": {"isa_context_frames": 2, "isa_context_position": "before"}})
    assert (out - ref).abs().max().item() <= 1e-5
    assert all(s["isa_calls"] == 1 for s in stats(t).values())
    tiny.fwd(t, x)  # no hint: unknown
    assert all(s["reasons"] == {"layout unknown": 1} for s in stats(t).values())


def test_isa_on_pipeline_transformer_only(tiny):
    pipe = tiny.wan_icl_pipe()
    pipe.set_progress_bar_config(disable=True)
    apply_isa(pipe.transformer, tiny.SPARSE)  # the transformer alone: the pipeline's attention_kwargs carry the layout
    _run(pipe, tiny)
    assert all(v["isa_calls"] == 4 and v["fallbacks"] == 0 for v in stats(pipe.transformer).values())


def test_bf16_runs(tiny):
    t = tiny.wan().to(torch.bfloat16)
    x = tiny.wan_inputs(frames=6)
    x["hidden_states"] = x["hidden_states"].bfloat16()
    x["encoder_hidden_states"] = x["encoder_hidden_states"].bfloat16()
    apply_isa(t, tiny.SPARSE, layout=WanICLLayout(3))
    out = tiny.fwd(t, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


# ----------------------------------------------------------------------------- the in-context edit pipeline
def _run(pipe, tiny, **kw):
    args = dict(prompt="a cat", negative_prompt="", video=tiny.source_video(), height=64, width=64,
                num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).frames


@pytest.mark.parametrize("position", ["after", "before"])
def test_pipeline_end_to_end_with_isa(tiny, position):
    pipe = tiny.wan_icl_pipe()
    pipe.set_progress_bar_config(disable=True)
    ref = _run(pipe, tiny, context_position=position)
    assert ref.shape == (1, 16, 3, 8, 8)  # target latents only

    apply_isa(pipe, tiny.SPARSE)
    layouts, shapes = [], []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["hidden_states"].shape)), with_kwargs=True)
    with observe_attention(pipe, lambda n, q, k, v, layout, step: layouts.append((n, layout, q.shape[1])), dense=False):
        out = _run(pipe, tiny, context_position=position)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # the transformer saw target + context frames; the layout matches the true token counts
    src_latent_frames = pipe.encode_video(tiny.source_video(), 64, 64).shape[2]
    assert shapes[0] == (1, 16, ref.shape[2] + src_latent_frames, 8, 8)
    per_frame = (8 // 2) * (8 // 2)
    spans = [("target", ref.shape[2] * per_frame), ("context", src_latent_frames * per_frame)]
    expected = Layout(spans if position == "after" else spans[::-1])
    assert all(layout == expected and n_tok == expected.num_tokens for _, layout, n_tok in layouts)
    s = stats(pipe)
    assert all(v["isa_calls"] == 4 and v["fallbacks"] == 0 for v in s.values())  # 2 steps x (cond, uncond)
    assert pipe.context_latent_frames is None  # reset after the call

    # exactness through the whole pipeline with all ratios 1
    remove_isa(pipe)
    apply_isa(pipe, tiny.EXACT)
    exact = _run(pipe, tiny, context_position=position)
    assert (exact - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)
    assert torch.equal(_run(pipe, tiny, context_position=position), ref)


def test_pipeline_decodes_video_and_cleans_up(tiny):
    pipe = tiny.wan_icl_pipe()
    pipe.set_progress_bar_config(disable=True)
    apply_isa(pipe, tiny.SPARSE)
    frames = _run(pipe, tiny, output_type="np", guidance_scale=1.0)
    assert frames.shape == (1, 9, 64, 64, 3)
    assert all(v["isa_calls"] == 2 for v in stats(pipe).values())
    assert len(pipe.transformer._forward_pre_hooks) == 1  # only ISA's; the pipeline's hooks are gone
    with pytest.raises(ValueError, match="video"):
        pipe(prompt="x", height=64, width=64)
    with pytest.raises(ValueError, match="frames"):
        _run(pipe, tiny, video=tiny.source_video(frames=8))


def test_pipeline_without_isa_and_plain_wan_pipeline_is_unknown_layout(tiny):
    """A pipeline whose calls carry no context runs dense with an explicit reason."""
    from diffusers import WanPipeline

    icl = tiny.wan_icl_pipe()
    pipe = WanPipeline(**icl.components)
    pipe.set_progress_bar_config(disable=True)
    apply_isa(pipe, tiny.SPARSE)
    pipe(prompt="a", negative_prompt="", height=64, width=64, num_frames=9, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert all(v["reasons"] == {"layout unknown": 1} for v in stats(pipe).values())


def test_two_experts(tiny):
    pipe = tiny.wan_icl_pipe(two_experts=True)
    pipe.set_progress_bar_config(disable=True)
    apply_isa(pipe, tiny.SPARSE)
    _run(pipe, tiny, num_inference_steps=2)
    s = stats(pipe)
    assert set(s) == {"blocks.0.attn1", "blocks.1.attn1", "transformer_2/blocks.0.attn1", "transformer_2/blocks.1.attn1"}
    assert sum(v["isa_calls"] for v in s.values()) == 2 * 2 * 2  # 2 steps x cond/uncond x 2 layers
    with pytest.raises(ValueError, match="ambiguous"):
        remove_isa(pipe) or apply_isa(pipe, {"blocks.0.attn1": None, "blocks.1.attn1": None})


def test_save_and_load(tiny, tmp_path):
    # diffusers loads models with _keep_in_fp32_modules (Wan) only through accelerate
    pytest.importorskip("accelerate")
    from isa_plugin.pipelines import WanInContextEditPipeline

    pipe = tiny.wan_icl_pipe()
    pipe.set_progress_bar_config(disable=True)
    ref = _run(pipe, tiny)
    pipe.save_pretrained(tmp_path)
    loaded = WanInContextEditPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is WanInContextEditPipeline
    assert torch.allclose(_run(loaded, tiny), ref, atol=1e-6)
    apply_isa(loaded, tiny.SPARSE)
    _run(loaded, tiny)
    assert all(v["isa_calls"] == 4 for v in stats(loaded).values())


def test_pipeline_per_token_timesteps(tiny):
    """Wan2.2-TI2V-style ``expand_timesteps``: the context tokens get timestep 0 appended."""
    from isa_plugin.pipelines import WanInContextEditPipeline

    pipe = WanInContextEditPipeline(**tiny.wan_icl_pipe().components, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].clone()), with_kwargs=True)
    apply_isa(pipe, tiny.SPARSE)
    out = _run(pipe, tiny)
    assert out.shape == (1, 16, 3, 8, 8)
    assert seen[0].shape == (1, 96) and (seen[0][:, 48:] == 0).all() and (seen[0][:, :48] > 0).all()
    assert all(v["isa_calls"] == 4 for v in stats(pipe).values())


def test_compile_after_apply(tiny):
    t = tiny.wan(num_layers=1)
    x = tiny.wan_inputs(frames=4)
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.EXACT, layout=WanICLLayout(2))
    compiled = torch.compile(t)
    out = tiny.fwd(compiled, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert stats(t)["blocks.0.attn1"]["isa_calls"] == 1


def test_adaptive_mode_in_a_model(tiny):
    """The adaptive mode through a Wan processor: mass = 1 equals the stock model, mass < 1 runs ISA."""
    from isa_plugin import ISAConfig

    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    apply_isa(t, ISAConfig(mode="adaptive", mass=1.0, alpha_s=1.0, block_size=8, pseudo_block=4),
              layout=WanICLLayout(context_frames=2))
    assert (tiny.fwd(t, x) - ref).abs().max().item() <= 1e-5
    remove_isa(t)
    apply_isa(t, ISAConfig(mode="adaptive", mass=0.6, alpha_s=0.5, block_size=8, pseudo_block=4),
              layout=WanICLLayout(context_frames=2))
    out = tiny.fwd(t, x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 and s["backends"] == {"reference": 1} for s in stats(t).values())
