"""LTX-Video family: prefix layout inference, plain calls, LTXConditionPipeline layout.

The family contract (signature, exactness, attn1 only, removal, state_dict) is checked in
test_family_contract.py.
"""

import numpy as np
import torch

from isa_plugin import Layout
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats
from isa_plugin.adapters.families.ltx import ltx_prefix_layout


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
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.SPARSE)
    assert torch.equal(tiny.fwd(t, x), ref)
    assert all(s["reasons"] == {"no context tokens (not an in-context call)": 1} for s in stats(t).values())
    remove_isa(t)
    apply_isa(t, tiny.SPARSE, layout=Layout([("target", 64), ("context", 32)]))  # explicit layout overrides
    tiny.fwd(t, x)
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
