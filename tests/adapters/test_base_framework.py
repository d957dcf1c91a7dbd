"""The adapter framework: apply/remove/stats, guard rails, registry, per-call context, observation."""

import importlib

import pytest
import torch

import isa_plugin
from isa_plugin import ISAConfig, Layout
from isa_plugin.adapters import (
    apply_isa,
    family_for,
    is_isa_applied,
    isa_processors,
    load_adapter_modules,
    observe_attention,
    registered_families,
    registered_pipelines,
    remove_isa,
    reset_stats,
    stats,
)
from isa_plugin.adapters.families.wan import WanICLLayout, WanISAAttnProcessor
from rel_helpers import counters  # noqa: E402


# ----------------------------------------------------------------------------- registry
def test_registry_enumerates_family_modules():
    names = load_adapter_modules()
    assert {"wan", "ltx", "ltx2"} <= set(names)
    fams = registered_families()
    for mod_name in names:
        mod = importlib.import_module(f"isa_plugin.adapters.families.{mod_name}")
        assert mod.__doc__ and len(mod.__doc__.strip()) > 80, f"{mod_name} is not documented"
        registered = [a for a in fams.values() if type(a).__module__ == mod.__name__]
        assert registered, f"{mod_name} registers no family adapter"
    import diffusers

    import isa_plugin.pipelines as own  # models this package ports (LIVEditor)

    for cls_name, adapter in fams.items():
        assert hasattr(diffusers, cls_name) or hasattr(own, cls_name), f"{cls_name} is neither a diffusers class nor one of isa_plugin.pipelines"
        assert type(adapter).__doc__, cls_name
        assert adapter.stock_processor_names, cls_name
    for cls_name, adapter in registered_pipelines().items():
        assert type(adapter).__doc__, cls_name


def test_registry_has_my_families():
    fams = registered_families()
    assert fams["WanTransformer3DModel"].name == "wan"
    assert fams["LTXVideoTransformer3DModel"].name == "ltx"
    assert fams["LTX2VideoTransformer3DModel"].name == "ltx2"
    pipes = registered_pipelines()
    for name in ("WanInContextEditPipeline", "LTXConditionPipeline", "LTX2InContextPipeline", "LTX2ConditionPipeline"):
        assert name in pipes


# ----------------------------------------------------------------------------- guard rails
def test_unsupported_class_lists_supported():
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_isa(torch.nn.Linear(2, 2), ISAConfig())
    with pytest.raises(TypeError, match="supported"):
        family_for(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        apply_isa(object(), ISAConfig())


def test_double_apply_refused(tiny):
    t = tiny.wan()
    apply_isa(t, tiny.SPARSE)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_isa(t, tiny.SPARSE)
    remove_isa(t)


def test_stats_and_remove_after_removal(tiny, caplog):
    """After remove_isa (or before any apply) stats() is {} and remove_isa() is a logged no-op."""
    t = tiny.wan()
    assert stats(t) == {}
    apply_isa(t, tiny.SPARSE)
    assert stats(t)
    original = remove_isa(t)
    assert original is None and stats(t) == {}
    procs = dict(t.attn_processors)
    with caplog.at_level("WARNING", logger="isa_plugin.adapters.install"):
        remove_isa(t)
    assert "not applied" in caplog.text and dict(t.attn_processors) == procs


def test_compiled_model_refused(tiny):
    t = tiny.wan()
    with pytest.raises(RuntimeError, match="before"):
        apply_isa(torch.compile(t), tiny.SPARSE)
    t.compile()  # nn.Module.compile: compiled in place
    with pytest.raises(RuntimeError, match="before"):
        apply_isa(t, tiny.SPARSE)
    t2 = tiny.wan()
    t2.compile_repeated_blocks()
    with pytest.raises(RuntimeError, match="before"):
        apply_isa(t2, tiny.SPARSE)
    assert not is_isa_applied(t2)


def test_compiled_component_of_pipeline_refused(tiny):
    pipe = tiny.wan_icl_pipe()
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(RuntimeError, match="before"):
        apply_isa(pipe, tiny.SPARSE)


def test_mismatched_mapping_refused(tiny):
    t = tiny.wan(num_layers=2)
    with pytest.raises(ValueError, match="unknown layers"):
        apply_isa(t, {"blocks.0.attn1": ISAConfig(), "blocks.1.attn1": ISAConfig(), "blocks.2.attn1": ISAConfig()})
    with pytest.raises(ValueError, match="missing layers"):
        apply_isa(t, {"blocks.0.attn1": ISAConfig()})
    with pytest.raises(ValueError, match="unknown layers"):
        apply_isa(t, {"blocks.0.attn2": ISAConfig(), "blocks.1.attn1": ISAConfig()})
    with pytest.raises(TypeError, match="ISAConfig"):
        apply_isa(t, {"blocks.0.attn1": 0.5, "blocks.1.attn1": None})
    with pytest.raises(TypeError):
        apply_isa(t, 0.5)
    assert not is_isa_applied(t)


def test_per_head_ratios_must_fit(tiny):
    t = tiny.wan()  # 2 heads
    with pytest.raises(ValueError, match="heads"):
        apply_isa(t, ISAConfig(alpha_f=(0.5, 0.5, 0.5)))
    assert not is_isa_applied(t)
    apply_isa(t, ISAConfig(alpha_f=(0.5, 1.0), block_size=8), layout=WanICLLayout(3))
    tiny.fwd(t, tiny.wan_inputs())
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


def test_no_layer_matched_raises(tiny):
    t = tiny.wan(num_layers=0)
    with pytest.raises(RuntimeError, match="no attention layer"):
        apply_isa(t, ISAConfig())


class _Profile:
    def __init__(self, configs, ok=True):
        self.configs, self.ok = configs, ok

    def check_compatible(self, transformer):
        if not self.ok:
            raise ValueError("profile calibrated for another model")

    def configs_for(self, transformer):
        return dict(self.configs)


def test_profile_duck_typed(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs()
    prof = _Profile({"blocks.0.attn1": tiny.SPARSE, "blocks.1.attn1": None})
    apply_isa(t, prof, layout=WanICLLayout(3))
    tiny.fwd(t, x)
    s = stats(t)
    assert s["blocks.0.attn1"]["isa_calls"] == 1
    assert s["blocks.1.attn1"] == counters(fallbacks={"layer left dense (no config)": 1})
    remove_isa(t)
    with pytest.raises(ValueError, match="another model"):
        apply_isa(t, _Profile({}, ok=False))
    with pytest.raises(ValueError, match="missing layers"):
        apply_isa(t, _Profile({"blocks.0.attn1": None}))


# ----------------------------------------------------------------------------- apply / remove
def test_layout_forms(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)  # 6 frames x 64 tokens
    lay = Layout([("target", 192), ("context", 192)])
    for spec in (lay, lambda n: Layout([("target", n // 2), ("context", n - n // 2)]), WanICLLayout(3)):
        apply_isa(t, tiny.SPARSE, layout=spec)
        tiny.fwd(t, x)
        assert all(s["isa_calls"] == 1 for s in stats(t).values()), spec
        remove_isa(t)
    with pytest.raises(TypeError):
        apply_isa(t, tiny.SPARSE, layout=42)


def test_fallback_reasons_are_counted(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.SPARSE)  # no layout: unknown
    assert torch.equal(tiny.fwd(t, x), ref)  # fallback is the stock dense path, bit for bit
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout unknown": 1}
    remove_isa(t)
    apply_isa(t, tiny.SPARSE, layout=Layout([("target", 100), ("context", 100)]))
    tiny.fwd(t, x)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout covers 200 tokens, call has 384": 1}
    reset_stats(t)
    assert stats(t)["blocks.0.attn1"] == counters()
    remove_isa(t)
    apply_isa(t, tiny.SPARSE, layout=Layout([("target", 384)]))
    tiny.fwd(t, x)
    assert stats(t)["blocks.1.attn1"]["reasons"] == {"no context tokens (not an in-context call)": 1}
    remove_isa(t)


def test_mask_falls_back_and_route_reasons(tiny):
    t = tiny.wan()
    apply_isa(t, tiny.SPARSE, layout=Layout([("target", 32), ("context", 32)]))
    attn = t.blocks[0].attn1
    proc = attn.processor
    h = torch.randn(1, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        attn(h, None, mask, None)
    assert proc.stats.fallbacks["attention mask present"] == 1
    q = torch.randn(1, 64, 2, 32)
    lay = Layout([("target", 32), ("context", 32)])
    assert proc.route(q, lay).backend == "reference"  # CPU: the PyTorch reference serves the call
    assert "head_dim" in proc.route(torch.randn(1, 64, 2, 12), lay).reason
    assert "dtype" in proc.route(q.to(torch.int32), lay).reason
    remove_isa(t)


def test_cross_attention_call_is_delegated(tiny):
    t = tiny.wan()
    stock = t.blocks[0].attn1.processor
    p = WanISAAttnProcessor(tiny.SPARSE, original=stock, layer_name="x")
    t.blocks[0].attn1.set_processor(p)
    h, e = torch.randn(1, 64, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        a = t.blocks[0].attn1(h, e)
        t.blocks[0].attn1.set_processor(stock)
        b = t.blocks[0].attn1(h, e)
    assert torch.equal(a, b) and p.stats.fallbacks["cross-attention call"] == 1


def test_direct_processor_use(tiny):
    """The processor class alone, through set_attn_processor, with an explicit layout."""
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    procs = dict(t.attn_processors)
    lay = Layout([("target", 192), ("context", 192)])
    mine = {}
    for k in procs:
        if ".attn1." in k:
            procs[k] = mine[k] = WanISAAttnProcessor(tiny.EXACT, layout=lay, layer_name=k)
    t.set_attn_processor(procs)
    out = tiny.fwd(t, x)
    assert (out - ref).abs().max() <= 1e-5
    assert all(p.stats.isa_calls == 1 for p in mine.values())


def test_fused_projections(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    t.fuse_qkv_projections()
    apply_isa(t, tiny.EXACT, layout=WanICLLayout(3))
    assert (tiny.fwd(t, x) - ref).abs().max() <= 1e-5
    assert all(s["isa_calls"] == 1 for s in stats(t).values())


def test_exported_from_package():
    assert isa_plugin.apply_isa is apply_isa and isa_plugin.remove_isa is remove_isa and isa_plugin.stats is stats


# ----------------------------------------------------------------------------- observation (calibration hook)
def test_observe_attention_dense_on_plain_model(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    before = t.attn_processors
    seen = []

    def obs(name, q, k, v, layout, step):
        seen.append((name, tuple(q.shape), layout, int(step.timestep[0]), step.call_index))

    with observe_attention(t, obs, layout=WanICLLayout(3)) as procs:
        assert list(procs) == ["blocks.0.attn1", "blocks.1.attn1"]
        out = tiny.fwd(t, x)
        tiny.fwd(t, x)
    assert torch.equal(out, ref)  # dense mode is the stock computation
    assert all(t.attn_processors[k] is v for k, v in before.items())
    assert not is_isa_applied(t)
    assert [s[0] for s in seen] == ["blocks.0.attn1", "blocks.1.attn1"] * 2
    assert seen[0][1] == (1, 384, 2, 32)
    assert seen[0][2] == Layout([("target", 192), ("context", 192)])
    assert seen[0][3] == 500 and [s[4] for s in seen] == [0, 0, 1, 1]


def test_observe_attention_on_isa_model(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    apply_isa(t, tiny.SPARSE, layout=WanICLLayout(3))
    sparse = tiny.fwd(t, x)
    seen = []
    with observe_attention(t, lambda *a: seen.append(a[0])):
        assert torch.equal(tiny.fwd(t, x), ref)
    with observe_attention(t, lambda *a: seen.append(a[0]), dense=False):
        assert torch.equal(tiny.fwd(t, x), sparse)
    assert len(seen) == 4
    assert all(p.observer is None and not p.force_dense for p in isa_processors(t).values())
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"dense mode": 1}
    assert is_isa_applied(t)


def test_hook_context_cleared_after_forward(tiny):
    t = tiny.wan()
    apply_isa(t, tiny.SPARSE, layout=WanICLLayout(3))
    tiny.fwd(t, tiny.wan_inputs())
    assert t._isa_state.context is None
    with pytest.raises(Exception):
        t(hidden_states=torch.randn(1, 3, 2, 2, 2), timestep=torch.tensor([1]), encoder_hidden_states=torch.randn(1, 2, 16))
    assert t._isa_state.context is None


class _BucketedProfile(_Profile):
    """Two timestep buckets: t < 500 dense everywhere, t >= 500 ISA everywhere."""

    timestep_edges = [500.0]
    num_buckets = 2

    def bucket_of(self, t):
        return int(float(t) >= 500.0)

    def configs_for(self, transformer, timestep=None):
        if timestep is None:
            raise ValueError("bucketed profile needs a timestep")
        cfg = ISAConfig(block_size=8) if self.bucket_of(timestep) else None
        return {n: cfg for n in self.configs}


def test_timestep_bucketed_profile(tiny):
    t = tiny.wan()
    prof = _BucketedProfile({"blocks.0.attn1": None, "blocks.1.attn1": None})
    apply_isa(t, prof, layout=WanICLLayout(3))
    for ts in (900, 100, 700):
        x = tiny.wan_inputs()
        x["timestep"] = torch.tensor([ts])
        tiny.fwd(t, x)
    s = stats(t)["blocks.0.attn1"]
    assert s["isa_calls"] == 2 and s["reasons"] == {"layer left dense (no config)": 1}


def test_real_threshold_profile(tiny):
    profile_mod = pytest.importorskip("isa_plugin.profile")
    ThresholdProfile, LayerSetting = profile_mod.ThresholdProfile, profile_mod.LayerSetting
    t = tiny.wan()
    names = ["blocks.0.attn1", "blocks.1.attn1"]
    prof = ThresholdProfile.uniform(names, ISAConfig(block_size=8), calibrated_on={"transformer_class": "WanTransformer3DModel"})
    apply_isa(t, prof, layout=WanICLLayout(3))
    tiny.fwd(t, tiny.wan_inputs())
    assert all(s["isa_calls"] == 1 for s in stats(t).values())
    remove_isa(t)
    with pytest.raises(ValueError, match="calibrated for"):
        apply_isa(t, ThresholdProfile.uniform(names, ISAConfig(), calibrated_on={"transformer_class": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError):
        apply_isa(t, ThresholdProfile.uniform(names[:1], ISAConfig()))
    # timestep buckets: dense below t=500, ISA from 500 on
    isa = LayerSetting(alpha_s=0.125, alpha_f=0.5, alpha_ns=0.0625)
    bucketed = ThresholdProfile(layers={n: [LayerSetting(dense=True), isa] for n in names}, block_size=8, timestep_edges=(500.0,))
    apply_isa(t, bucketed, layout=WanICLLayout(3))
    for ts in (900, 100, 700):
        x = tiny.wan_inputs()
        x["timestep"] = torch.tensor([ts])
        tiny.fwd(t, x)
    s = stats(t)["blocks.1.attn1"]
    assert s["isa_calls"] == 2 and s["fallbacks"] == 1
    assert not is_isa_applied(tiny.wan())


def test_kernels_unavailable_falls_back(tiny):
    t = tiny.wan()
    x = tiny.wan_inputs(frames=6)
    ref = tiny.fwd(t, x)
    apply_isa(t, ISAConfig(block_size=8, backend="triton"), layout=WanICLLayout(3))  # CPU: kernels cannot serve
    assert torch.equal(tiny.fwd(t, x), ref)
    (reason,) = stats(t)["blocks.0.attn1"]["reasons"]
    assert reason.startswith("ISA kernels unavailable")
