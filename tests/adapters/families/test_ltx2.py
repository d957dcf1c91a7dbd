"""LTX-2 family: perturbed STG, layout rules, mask fallback, IC-LoRA and condition pipelines.

The family contract (signatures, exactness for both RoPE types, gated and perturbed, video attn1 only,
removal) is checked in test_family_contract.py.
"""

import pytest
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats
from isa_plugin.adapters.families.ltx2 import ltx2_appended_layout


def test_perturbed_stg(tiny):
    t = tiny.ltx2(perturbed_attn=True)
    x = tiny.ltx2_inputs(frames=3, extra_tokens=48, batch=2)
    x.update(spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([1.0, 0.0]))
    ref_v = tiny.fwd(t, x)
    apply_isa(t, tiny.EXACT)
    v = tiny.fwd(t, x)
    assert (v - ref_v).abs().max().item() <= 1e-5
    remove_isa(t)
    x["perturbation_mask"] = torch.zeros(2)
    ref_v = tiny.fwd(t, x)
    apply_isa(t, tiny.EXACT)
    v = tiny.fwd(t, x)
    assert (v - ref_v).abs().max().item() <= 1e-5
    assert stats(t)["transformer_blocks.1.attn1"]["reasons"] == {"all perturbed (attention skipped)": 1}


def test_layout_rules(tiny):
    t = tiny.ltx2()
    x = tiny.ltx2_inputs(frames=3, extra_tokens=40)
    assert ltx2_appended_layout(t, x) == Layout([("target", 96), ("context", 40)])
    x0 = tiny.ltx2_inputs(frames=3)
    assert ltx2_appended_layout(t, x0) == Layout([("target", 96)])
    assert ltx2_appended_layout(t, {"hidden_states": x0["hidden_states"]}) is None
    apply_isa(t, tiny.SPARSE)
    tiny.fwd(t, x0)
    assert all(s["reasons"] == {"no context tokens (not an in-context call)": 1} for s in stats(t).values())


def test_self_attention_mask_falls_back(tiny):
    t = tiny.ltx2()
    x = tiny.ltx2_inputs(frames=3, extra_tokens=32)
    S = x["hidden_states"].shape[1]
    x["video_self_attention_mask"] = torch.ones(1, S, S)
    ref_v = tiny.fwd(t, x)
    apply_isa(t, tiny.SPARSE)
    v = tiny.fwd(t, x)
    assert torch.equal(v, ref_v)
    assert all(s["reasons"] == {"attention mask present": 1} for s in stats(t).values())


def _ic_args(pipe, **kw):
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    g = torch.Generator().manual_seed(0)
    ref_video = torch.rand(3, 3, 32, 32, generator=g)
    pe = torch.randn(1, 8, 96, generator=g)
    pm = torch.ones(1, 8, dtype=torch.long)
    args = dict(
        reference_conditions=[LTX2ReferenceCondition(frames=ref_video)], prompt_embeds=pe, prompt_attention_mask=pm,
        negative_prompt_embeds=pe, negative_prompt_attention_mask=pm, height=32, width=32, num_frames=3,
        frame_rate=25.0, num_inference_steps=2, guidance_scale=3.0, stg_scale=0.0, audio_stg_scale=0.0,
        modality_scale=1.0, audio_modality_scale=1.0, spatio_temporal_guidance_blocks=None, output_type="latent",
        generator=torch.Generator().manual_seed(1),
    )
    args.update(kw)
    return args


@pytest.mark.parametrize("downscale", [1, 2])
def test_in_context_pipeline_end_to_end(tiny, downscale):
    """LTX2InContextPipeline (IC-LoRA): the reference video's tokens are appended after the noisy tokens."""
    pipe = tiny.ltx2_ic_pipe()
    pipe.set_progress_bar_config(disable=True)
    def args():
        return _ic_args(pipe, reference_downscale_factor=downscale)

    ref = pipe(**args()).frames
    apply_isa(pipe, tiny.SPARSE)
    calls, seen = [], []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append((k["hidden_states"].shape[1], k["num_frames"], k["height"], k["width"])), with_kwargs=True
    )
    with observe_attention(pipe, lambda n, q, k, v, layout, step: seen.append(layout), dense=False):
        out = pipe(**args()).frames
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # target = the pipeline's noisy latent grid (its output latents); the appended reference is context
    _, _, F, H, W = ref.shape
    S = calls[0][0]
    assert calls[0][1:] == (F, H, W) and S > F * H * W
    expected = Layout([("target", F * H * W), ("context", S - F * H * W)])
    assert seen and all(layout == expected for layout in seen)
    assert all(s["isa_calls"] == 2 and s["fallbacks"] == 0 for s in stats(pipe).values())
    remove_isa(pipe)
    apply_isa(pipe, tiny.EXACT)
    exact = pipe(**args()).frames
    assert (exact - ref).abs().max().item() <= 1e-4
    remove_isa(pipe)
    assert torch.equal(pipe(**args()).frames, ref)


def test_condition_pipeline_keyframe_is_appended_context(tiny):
    """LTX2ConditionPipeline: a keyframe condition at a latent index > 0 is appended after the noisy tokens."""
    from diffusers import LTX2ConditionPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    ic = tiny.ltx2_ic_pipe()
    names = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder")
    pipe = LTX2ConditionPipeline(**{k: v for k, v in ic.components.items() if k in names})
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, pm = torch.randn(1, 8, 96, generator=g), torch.ones(1, 8, dtype=torch.long)
    args = dict(
        conditions=[LTX2VideoCondition(frames=torch.rand(1, 3, 32, 32, generator=g), index=2, strength=1.0, crf=0)],
        prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=pe, negative_prompt_attention_mask=pm,
        height=32, width=32, num_frames=5, frame_rate=25.0, num_inference_steps=2, guidance_scale=3.0, stg_scale=0.0,
        audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0, spatio_temporal_guidance_blocks=None,
        output_type="latent",
    )
    apply_isa(pipe, tiny.SPARSE)
    calls, seen = [], []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[1]), with_kwargs=True)
    with observe_attention(pipe, lambda n, q, k, v, layout, step: seen.append(layout), dense=False):
        out = pipe(**args).frames
    _, _, F, H, W = out.shape
    assert calls[0] > F * H * W
    assert seen and all(l == Layout([("target", F * H * W), ("context", calls[0] - F * H * W)]) for l in seen)
    assert all(s["isa_calls"] == 2 and s["fallbacks"] == 0 for s in stats(pipe).values())
