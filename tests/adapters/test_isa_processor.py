"""``ISAProcessor`` through diffusers' ``set_attn_processor`` behaves exactly like ``apply_isa``, for every family.

On each registered family's tiny pipeline (:func:`isa_plugin.pipelines.tiny.build_tiny_pipeline`, one denoising
step): ``pipe.transformer.set_attn_processor(ISAProcessor(profile))`` gives the same output bit for bit and the
same counters as ``apply_isa(pipe, profile)``, with a per-layer profile (settings differing by layer, one layer
dense); the same processor classes and per-layer configs; the other attention layers (cross-attention,
audio) keep the very processor objects they had; ``remove_isa`` restores every processor object and removes the
hooks. Families whose transformer has no ``set_attn_processor`` (HunyuanVideo-Framepack) are served by
``apply_isa`` only, and an ``ISAProcessor`` set on a single module raises on its first call.
"""

import pytest
import torch

import isa_plugin
from isa_plugin import ISAConfig, ISAProcessor, apply_isa, remove_isa, stats
from isa_plugin.adapters import family_for, is_isa_applied, registered_families

FAMILIES = sorted({f.name for f in registered_families().values()})
ISA = dict(alpha_s=0.125, alpha_f=0.5, alpha_ns=0.0625)


def _profile(transformer):
    """A per-layer profile: even layers ISA (two settings alternating), odd layers dense."""
    from isa_plugin.profile import LayerSetting, ThresholdProfile

    names = list(family_for(transformer).self_attention_layers(transformer))
    settings = [LayerSetting(**ISA), LayerSetting(dense=True), LayerSetting(alpha_s=0.25, alpha_f=1.0, alpha_ns=0.125)]
    return ThresholdProfile(layers={n: [settings[i % 3] if len(names) > 2 else settings[i % 2]] for i, n in enumerate(names)},
                            block_size=8)


def _runner(pipe, family):
    from isa_plugin.calibration.runners import runner_for
    from isa_plugin.calibration.video import read_video, sample_video_path

    r = runner_for(pipe)
    size = None if family == "qwenimage" else 32  # QwenImage resizes its condition image itself
    frames = None if r.media == "image" else 1 + r.temporal_factor(pipe)
    sample, h, w, f = r.prepare(pipe, read_video(sample_video_path()), height=size, width=size, num_frames=frames)

    def run():
        with torch.no_grad():
            out = r.call(pipe, sample, "edit", height=h, width=w, num_frames=f, steps=1, generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images

    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_isa_processor_equals_apply_isa(family):
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    t = pipe.transformer
    run, profile = _runner(pipe, family), _profile(t)
    if not hasattr(type(t), "set_attn_processor"):  # no diffusers AttentionMixin: apply_isa serves it
        layer = next(iter(family_for(t).self_attention_layers(t).values()))
        layer.set_processor(ISAProcessor(profile))
        with pytest.raises(RuntimeError, match="set_attn_processor"):
            run()
        return
    before = dict(t.attn_processors)

    apply_isa(pipe, profile)
    expected, expected_stats = run(), stats(pipe)
    expected_procs = {k: (type(p), getattr(p, "config", None)) for k, p in t.attn_processors.items()}
    remove_isa(pipe)

    t.set_attn_processor(ISAProcessor(profile))
    assert is_isa_applied(pipe)
    got = run()
    assert torch.equal(got, expected)
    assert stats(pipe) == expected_stats
    assert any(s["isa_calls"] for s in expected_stats.values())
    assert any(s["reasons"].get("layer left dense (no config)") for s in expected_stats.values())
    procs = t.attn_processors
    assert {k: (type(p), getattr(p, "config", None)) for k, p in procs.items()} == expected_procs
    isa_layers = {f"{n}.processor" for n in family_for(t).self_attention_layers(t)}
    assert all(procs[k] is p for k, p in before.items() if k not in isa_layers)  # cross-attention etc. untouched
    assert all(type(procs[k]).__name__.endswith("ISAAttnProcessor") for k in isa_layers)

    remove_isa(pipe)
    assert not is_isa_applied(pipe) and stats(pipe) == {}
    assert all(t.attn_processors[k] is p for k, p in before.items())
    assert not t._forward_pre_hooks and not t._forward_hooks


def test_isa_processor_guard_rails(tiny):
    t = tiny.wan()
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    with pytest.raises(TypeError, match="ISAConfig"):
        ISAProcessor("fast")
    with pytest.raises(ValueError, match="missing layers"):
        t.set_attn_processor(ISAProcessor({layers[0]: ISAConfig()}))
    assert not is_isa_applied(t)
    proc = ISAProcessor(dict.fromkeys(layers, tiny.SPARSE))
    t.set_attn_processor(proc)
    with pytest.raises(RuntimeError, match="already applied"):
        t.set_attn_processor(ISAProcessor(ISAConfig()))
    remove_isa(t)
    t.set_attn_processor(proc)  # the same object serves again (e.g. a second transformer)
    assert set(stats(t)) == set(layers)
    remove_isa(t)
    from diffusers import SD3Transformer2DModel

    other = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4)
    with pytest.raises(TypeError, match="not supported by isa_plugin"):
        other.set_attn_processor(ISAProcessor(ISAConfig()))

def test_isa_processor_on_one_module_raises(tiny):
    """Set on one attention module (not through set_attn_processor) it refuses the call instead of doing nothing."""
    t = tiny.wan()
    t.blocks[0].attn1.set_processor(ISAProcessor(ISAConfig()))
    with pytest.raises(RuntimeError, match="set_attn_processor"):
        tiny.fwd(t, tiny.wan_inputs())


def test_isa_processor_with_layout(tiny):
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = tiny.wan()
    t.set_attn_processor(ISAProcessor(tiny.SPARSE, layout=WanICLLayout(context_frames=2)))
    tiny.fwd(t, tiny.wan_inputs())
    assert all(s["isa_calls"] == 1 for s in stats(t).values())
    assert isa_plugin.ISAProcessor is ISAProcessor
    remove_isa(t)
