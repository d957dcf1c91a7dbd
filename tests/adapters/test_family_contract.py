"""The contract every registered model family keeps, checked from one table parametrised over the registry.

For each family: its ISA processors take exactly the stock processors' parameters; with all ratios 1 the
model equals the stock model (every output within 1e-5); layers configured dense reproduce the stock model
bit for bit; with default ratios ISA serves exactly the family's self-attention layers, the state_dict is
untouched, and ``remove_isa`` restores the very same processor objects, removes its hooks, and gives
bit-identical outputs.

A new family registers itself and then needs a row in :data:`CASES` (a test fails until it has one).
Family-specific behaviour (layouts, pipelines end to end, quirks) stays in ``test_<family>_family.py``.
"""

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import pytest
import torch

from isa_plugin import apply_isa, remove_isa, stats
from isa_plugin.adapters import family_for, registered_families
from rel_helpers import counters

#: what ``stats`` reports for a layer that served one call through ISA on CPU
ONE_ISA_CALL = counters(1)
#: all ratios 1: ISA is exact attention up to float rounding
EXACT_ATOL = 1e-5


def _wan_layout(context_frames, position="after"):
    def make():
        from isa_plugin.adapters.families.wan import WanICLLayout

        return WanICLLayout(context_frames=context_frames, position=position)

    return make


@dataclass(frozen=True)
class Run:
    """One forward configuration of a family's tiny model."""

    id: str
    model: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the tiny builder
    inputs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the inputs builder
    layout: Optional[Callable[[], Any]] = None  # makes the ``layout=`` of apply_isa (None: inferred from the call)


@dataclass(frozen=True)
class Case:
    """One registered family: its tiny model, what ISA must replace on it, and the runs to check."""

    model: str  # conftest builder, reached as ``getattr(tiny, model)``
    inputs: str  # conftest inputs builder
    layers: Callable[..., List[str]]  # builder kwargs -> the layers ISA serves, in order
    processors: Dict[str, str]  # ISA processor class -> the stock processor class it replaces
    kept: FrozenSet[str]  # exactly the classes of the processors the sparse run leaves in place (other layers)
    exact: Tuple[Run, ...]  # all ratios 1 equals the stock model
    dense: Run  # every layer configured dense reproduces the stock model bit for bit
    sparse: Run  # default ratios use ISA, then remove_isa restores


def _double_single(num_layers=2, num_single_layers=2, **_):
    return [f"transformer_blocks.{i}.attn" for i in range(num_layers)] + [
        f"single_transformer_blocks.{i}.attn" for i in range(num_single_layers)
    ]


#: transformer class name (as registered) -> its contract case
CASES: Dict[str, Case] = {
    "WanTransformer3DModel": Case(
        model="wan",
        inputs="wan_inputs",
        layers=lambda num_layers=2, **_: [f"blocks.{i}.attn1" for i in range(num_layers)],
        processors={"WanISAAttnProcessor": "WanAttnProcessor"},
        kept=frozenset({"WanAttnProcessor"}),  # attn2: cross-attention to the text
        exact=tuple(
            Run(f"{position}-b{batch}", inputs=dict(frames=6, batch=batch), layout=_wan_layout(2, position))
            for batch in (1, 2)
            for position in ("after", "before")
        ),
        dense=Run("b1", inputs=dict(frames=6), layout=_wan_layout(3)),
        sparse=Run("3-layers", model=dict(num_layers=3), inputs=dict(frames=6), layout=_wan_layout(3)),
    ),
    "LTXVideoTransformer3DModel": Case(
        model="ltx",
        inputs="ltx_inputs",
        layers=lambda num_layers=2, **_: [f"transformer_blocks.{i}.attn1" for i in range(num_layers)],
        processors={"LTXISAAttnProcessor": "LTXVideoAttnProcessor"},
        kept=frozenset({"LTXVideoAttnProcessor"}),  # attn2: cross-attention to the text
        exact=tuple(Run(f"b{batch}", inputs=dict(frames=3, prefix_frames=2, batch=batch)) for batch in (1, 2)),
        dense=Run("b1", inputs=dict(frames=3, prefix_frames=2)),
        sparse=Run("3-layers", model=dict(num_layers=3), inputs=dict(frames=3, prefix_frames=2)),
    ),
    "LTX2VideoTransformer3DModel": Case(
        model="ltx2",
        inputs="ltx2_inputs",
        layers=lambda num_layers=2, **_: [f"transformer_blocks.{i}.attn1" for i in range(num_layers)],
        processors={
            "LTX2ISAAttnProcessor": "LTX2AudioVideoAttnProcessor",
            "LTX2PerturbedISAAttnProcessor": "LTX2PerturbedAttnProcessor",
        },
        kept=frozenset({"LTX2AudioVideoAttnProcessor"}),  # audio self-attention, text and audio<->video cross-attention
        exact=tuple(
            Run(f"{name}-b{batch}", model=kw, inputs=dict(frames=3, extra_tokens=48, batch=batch))
            for name, kw in (
                ("interleaved", {}),
                ("split", dict(rope_type="split")),
                ("gated", dict(gated_attn=True)),
                ("perturbed-split", dict(perturbed_attn=True, rope_type="split")),
            )
            for batch in (1, 2)
        ),
        dense=Run("perturbed-b1", model=dict(perturbed_attn=True), inputs=dict(frames=3, extra_tokens=48)),
        sparse=Run("3-layers", model=dict(num_layers=3), inputs=dict(frames=3, extra_tokens=96)),
    ),
    "FluxTransformer2DModel": Case(
        model="flux",
        inputs="flux_inputs",
        layers=_double_single,
        processors={"FluxISAAttnProcessor": "FluxAttnProcessor"},
        kept=frozenset(),  # every attention layer is a joint (text + image) self-attention
        exact=tuple(Run(f"b{batch}", inputs=dict(batch=batch)) for batch in (1, 2)),
        dense=Run("b1"),
        sparse=Run("b1"),
    ),
    "HunyuanVideoFramepackTransformer3DModel": Case(
        model="framepack",
        inputs="framepack_inputs",
        layers=_double_single,
        processors={"FramepackISAAttnProcessor": "HunyuanVideoAttnProcessor2_0"},
        kept=frozenset({"AttnProcessor2_0"}),  # the text token refiner
        exact=tuple(
            Run(f"b{batch}-text{text_valid}", inputs=dict(batch=batch, text_valid=text_valid))
            for batch, text_valid in ((1, None), (2, None), (2, [8, 3]), (3, [5, 8, 1]))
        ),
        dense=Run("b2-text[8, 3]", inputs=dict(batch=2, text_valid=[8, 3])),
        sparse=Run("b1"),
    ),
    "QwenImageTransformer2DModel": Case(
        model="qwen",
        inputs="qwen_inputs",
        layers=lambda num_layers=2, **_: [f"transformer_blocks.{i}.attn" for i in range(num_layers)],
        processors={"QwenImageISAAttnProcessor": "QwenDoubleStreamAttnProcessor2_0"},
        kept=frozenset(),
        exact=tuple(
            # zero_cond_t: Qwen-Image-Edit-2511 (condition tokens modulated at t=0)
            Run(f"b{batch}-text{text_valid}" + ("-zero_cond_t" if zero else ""), model=dict(zero_cond_t=zero),
                inputs=dict(batch=batch, text_valid=text_valid))
            for batch, text_valid, zero in ((1, None, False), (2, None, False), (1, [9], False), (2, [12, 5], False), (2, [12, 4], True))
        ),
        dense=Run("b2-text[12, 5]", inputs=dict(batch=2, text_valid=[12, 5])),
        sparse=Run("b1"),
    ),
    "LIVEditorTransformer3DModel": Case(
        model="liveditor",
        inputs="liveditor_inputs",
        layers=lambda num_layers=2, **_: [f"blocks.{i}.attn1" for i in range(num_layers)],
        processors={"LIVEditorISAAttnProcessor": "LIVEditorAttnProcessor"},  # dense attention + gated coarse residual
        kept=frozenset({"WanAttnProcessor"}),  # attn2: cross-attention to the text
        exact=tuple(
            Run(f"b{batch}-src{source_frames}" + (f"-coarse{cbs}" if cbs else ""),
                model=dict(coarse_block_size=cbs) if cbs else {},
                inputs=dict(batch=batch, source_frames=source_frames))
            for batch, source_frames, cbs in ((1, 3, None), (2, 3, None), (2, 2, 16))
        ),
        dense=Run("b2", inputs=dict(batch=2)),
        sparse=Run("3-layers", model=dict(num_layers=3)),
    ),
}

REGISTERED = sorted(registered_families())


def _params(runs_of):
    """(transformer class, run) for every registered family and run; a family without a case gets one run."""
    return [
        pytest.param(cls, run, id=f"{cls}-{run.id}" if run else cls)
        for cls in REGISTERED
        for run in (runs_of(CASES[cls]) if cls in CASES else (None,))
    ]


def _case(cls) -> Case:
    if cls not in CASES:
        pytest.fail(f"registered family {registered_families()[cls]!r} has no contract case: add {cls!r} to CASES")
    return CASES[cls]


def _build(tiny, cls, run):
    """The tiny model and inputs of ``run``, checked to be served by the registered family ``cls``."""
    case = _case(cls)
    model = getattr(tiny, case.model)(**run.model)
    assert family_for(model) is registered_families()[cls]
    return model, getattr(tiny, case.inputs)(**run.inputs), case.layers(**run.model)


def _apply(model, config, run):
    apply_isa(model, config, **({"layout": run.layout()} if run.layout else {}))


def test_every_registered_family_has_a_case():
    missing = sorted(set(REGISTERED) - set(CASES))
    assert not missing, f"registered families without a contract case in CASES: {missing}"


def test_every_case_is_a_registered_family():
    unknown = sorted(set(CASES) - set(REGISTERED))
    assert not unknown, f"CASES names transformer classes no family registers: {unknown}"


@pytest.mark.parametrize("cls", REGISTERED)
def test_processor_signature_matches_stock(tiny, cls):
    """diffusers drops kwargs a processor does not name: ISA processors name exactly the stock parameters.

    Checked on the processors apply_isa installs, for every model variant of the case's exact runs.
    """
    case = _case(cls)
    seen = set()
    for model_kw in {tuple(sorted(run.model.items())): run.model for run in case.exact}.values():
        model = getattr(tiny, case.model)(**model_kw)
        before = tiny.processors(model)
        apply_isa(model, tiny.SPARSE)
        after = tiny.processors(model)
        for name in case.layers(**model_kw):
            mine, stock = type(after[name]), type(before[name])
            assert case.processors.get(mine.__name__) == stock.__name__, (name, mine, stock)
            assert stock.__name__ in registered_families()[cls].stock_processor_names
            assert list(inspect.signature(mine.__call__).parameters) == list(inspect.signature(stock.__call__).parameters)
            seen.add(mine.__name__)
    assert seen == set(case.processors), f"processor classes not exercised by the exact runs: {set(case.processors) - seen}"


@pytest.mark.parametrize("cls,run", _params(lambda case: case.exact))
def test_all_ratios_one_equals_stock(tiny, cls, run):
    model, x, layers = _build(tiny, cls, run)
    ref = tiny.fwd(model, x, all_outputs=True)
    _apply(model, tiny.EXACT, run)
    out = tiny.fwd(model, x, all_outputs=True)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert (o - r).abs().max().item() <= EXACT_ATOL
    assert list(stats(model)) == layers
    assert all(s == ONE_ISA_CALL for s in stats(model).values()), stats(model)


@pytest.mark.parametrize("cls,run", _params(lambda case: (case.dense,)))
def test_dense_layers_reproduce_stock_bitwise(tiny, cls, run):
    """Layers left dense run the processor's own copy of the stock computation: bit-identical outputs."""
    model, x, layers = _build(tiny, cls, run)
    ref = tiny.fwd(model, x, all_outputs=True)
    _apply(model, {n: None for n in layers}, run)
    out = tiny.fwd(model, x, all_outputs=True)
    assert len(out) == len(ref) and all(torch.equal(o, r) for o, r in zip(out, ref))
    assert all(s["reasons"] == {"layer left dense (no config)": 1} and s["isa_calls"] == 0 for s in stats(model).values())


@pytest.mark.parametrize("cls,run", _params(lambda case: (case.sparse,)))
def test_default_ratios_use_isa_then_remove_restores(tiny, cls, run):
    case = _case(cls)
    model, x, layers = _build(tiny, cls, run)
    ref = tiny.fwd(model, x, all_outputs=True)
    before = tiny.processors(model)
    hooks = (list(model._forward_pre_hooks), list(model._forward_hooks))
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    _apply(model, tiny.SPARSE, run)
    out = tiny.fwd(model, x, all_outputs=True)
    assert all(torch.isfinite(o).all() for o in out) and not torch.equal(out[0], ref[0])
    assert list(stats(model)) == layers
    assert all(s == ONE_ISA_CALL for s in stats(model).values()), stats(model)
    after = tiny.processors(model)
    assert after.keys() == before.keys()
    assert {type(p).__name__ for n, p in before.items() if n not in layers} == case.kept
    for name, proc in after.items():
        if name in layers:  # ISA on the family's self-attention layers only
            assert type(proc).__name__ in case.processors and type(proc).__module__.startswith("isa_plugin."), name
        else:  # every other attention layer keeps its very processor object
            assert proc is before[name] and type(proc).__name__ in case.kept, name
    assert list(model.state_dict()) == list(sd) and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())

    remove_isa(model)
    assert all(p is before[n] for n, p in tiny.processors(model).items())
    assert (list(model._forward_pre_hooks), list(model._forward_hooks)) == hooks  # ISA's hooks are gone
    restored = tiny.fwd(model, x, all_outputs=True)
    assert len(restored) == len(ref) and all(torch.equal(o, r) for o, r in zip(restored, ref))
    assert list(model.state_dict()) == list(sd) and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
