"""``torch.compile(transformer)`` after ``apply_isa`` (CPU, reference path, tiny Wan): it runs, matches
eager, counts its calls, and dynamo breaks no graph inside the attention (processor, entry point, kernels).

The only Python-side work that reads a tensor is the timestep-bucket switch of a bucketed profile
(a forward pre-hook reads the timestep, before any attention runs); it is allowed to break there.
"""

import warnings

import pytest
import torch

from rel_helpers import SPARSE, counters
from isa_plugin import ThresholdProfile, apply_isa, remove_isa, stats
from isa_plugin.layer_setting import LayerSetting

pytest.importorskip("diffusers")

from isa_plugin.adapters.families.wan import WanICLLayout  # noqa: E402

NAMES = ["blocks.0.attn1"]  # one-block models: compile time dominates these tests
#: code that is "inside the attention": a break with one of these frames in its user stack fails the test
ATTENTION_CODE = ("isa_plugin/attention.py", "isa_plugin/adapters/processor.py", "isa_plugin/kernels/", "isa_plugin/layout.py", "isa_plugin/config.py")
ATTENTION_FUNCS = ("__call__", "attend", "route", "why_dense", "select_backend", "run_isa", "resolve_layout", "isa_attention")


def _bucketed():
    isa = LayerSetting(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25)
    return ThresholdProfile(layers={n: [LayerSetting(dense=True), isa] for n in NAMES}, block_size=8, timestep_edges=(500.0,))


CASES = {
    "static-layout": (lambda: SPARSE, dict(layout=WanICLLayout(2)), {}),
    "attention-kwargs-layout": (lambda: SPARSE, {}, dict(attention_kwargs={"isa_context_frames": 2})),
    "share-plan-cfg-batch": (lambda: SPARSE.replace(share_plan=True), dict(layout=WanICLLayout(2)), dict(batch=2)),
    "fallback-layout-unknown": (lambda: SPARSE, {}, {}),
    "bucketed-profile": (_bucketed, dict(layout=WanICLLayout(2)), {}),
}


def _inputs(wan_kit, extra):
    extra = dict(extra)
    x = wan_kit.wan_inputs(frames=4, batch=extra.pop("batch", 1))
    x.update(extra)
    return x


def _breaks_inside_attention(explain):
    bad = []
    for br in explain.break_reasons:
        for fr in br.user_stack:
            fn = fr.filename.replace("\\", "/")
            if any(p in fn for p in ATTENTION_CODE) or ("isa_plugin/adapters/" in fn and fr.name in ATTENTION_FUNCS):
                bad.append(f"{br.reason.splitlines()[0]} at {fn}:{fr.lineno} ({fr.name})")
                break
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_no_graph_break_inside_attention(wan_kit, case):
    make_cfg, apply_kw, extra = CASES[case]
    t = wan_kit.wan(num_layers=1)
    apply_isa(t, make_cfg(), **apply_kw)
    x = _inputs(wan_kit, extra)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(t)(**x, return_dict=False)
    assert not _breaks_inside_attention(explain), _breaks_inside_attention(explain)
    if case != "bucketed-profile":
        assert explain.graph_break_count == 0, [b.reason for b in explain.break_reasons]
    else:  # the timestep read of the bucket switch, in the pre-hook, and nothing else
        # one break: the timestep read of the bucket switch (dynamo may count its resume as a second split)
        assert len(explain.break_reasons) == 1, [b.reason for b in explain.break_reasons]
        assert all(any(fr.name in ("_select_bucket", "timestep_scalar") for fr in b.user_stack) for b in explain.break_reasons)


@pytest.mark.parametrize("case", ["static-layout", "share-plan-cfg-batch", "fallback-layout-unknown", "bucketed-profile"])
def test_compiled_matches_eager_and_counts(wan_kit, case):
    make_cfg, apply_kw, extra = CASES[case]
    t = wan_kit.wan(num_layers=1)
    apply_isa(t, make_cfg(), **apply_kw)
    x = _inputs(wan_kit, extra)
    eager = wan_kit.run(t, x)
    eager_stats = stats(t)
    from isa_plugin.adapters import reset_stats

    reset_stats(t)
    torch._dynamo.reset()
    compiled = torch.compile(t)
    out = wan_kit.run(compiled, x)
    assert (out - eager).abs().max().item() <= 1e-5
    assert stats(t) == eager_stats  # counters still move under compile
    if case == "bucketed-profile":  # another bucket: recompiled for the switched configs, still correct
        reset_stats(t)
        x2 = dict(x, timestep=torch.full_like(x["timestep"], 100))  # the dense bucket
        out2 = wan_kit.run(compiled, x2)
        assert (out2 - wan_kit.run(t, x2)).abs().max().item() <= 1e-5
        assert stats(t)["blocks.0.attn1"]["reasons"] == {"layer left dense (no config)": 2}


def test_fullgraph_compile(wan_kit):
    t = wan_kit.wan(num_layers=1)
    apply_isa(t, SPARSE, layout=WanICLLayout(2))
    x = wan_kit.wan_inputs(frames=4)
    eager = wan_kit.run(t, x)
    torch._dynamo.reset()
    out = wan_kit.run(torch.compile(t, fullgraph=True), x)
    assert (out - eager).abs().max().item() <= 1e-5


def test_compiled_at_several_sizes(wan_kit):
    """A compiled model run at other frame counts and resolutions: recompiled or dynamic, still ISA, still right."""
    t = wan_kit.wan(num_layers=1)
    apply_isa(t, SPARSE, layout=WanICLLayout(2))
    torch._dynamo.reset()
    compiled = torch.compile(t)
    calls = 0
    for frames, size in ((4, 16), (6, 16), (4, 24)):
        x = wan_kit.wan_inputs(frames=frames, size=size)
        assert (wan_kit.run(compiled, x) - wan_kit.run(t, x)).abs().max().item() <= 1e-5
        calls += 2
        assert stats(t)["blocks.0.attn1"] == counters(calls)


def test_remove_after_compile_restores_stock(wan_kit):
    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    apply_isa(t, SPARSE, layout=WanICLLayout(2))
    torch._dynamo.reset()
    wan_kit.run(torch.compile(t), x)
    remove_isa(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        assert (wan_kit.run(torch.compile(t), x) - ref).abs().max().item() <= 1e-5


def test_regional_compile_after_apply(wan_kit):
    """diffusers' ``compile_repeated_blocks`` (blocks compiled in place) after ``apply_isa``."""
    from isa_plugin.adapters import reset_stats

    t = wan_kit.wan(num_layers=2)
    x = wan_kit.wan_inputs(frames=4)
    apply_isa(t, SPARSE, layout=WanICLLayout(2))
    eager = wan_kit.run(t, x)
    reset_stats(t)
    torch._dynamo.reset()
    t.compile_repeated_blocks()
    assert (wan_kit.run(t, x) - eager).abs().max().item() <= 1e-5
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(t).values())
