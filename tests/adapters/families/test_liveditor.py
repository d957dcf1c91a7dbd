"""LIVEditor under ISA: isa_attention's residual gate, the family adapter, layouts and fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

import isa_plugin.adapters
from isa_plugin import ISAConfig, Layout, isa_attention
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats
from isa_plugin.adapters.families.liveditor import LIVEditorISAAttnProcessor, LIVEditorLayout, liveditor_layout
from isa_plugin.attention import dense_attention
from isa_plugin.pipelines import LIVEditorTransformer3DModel

EXACT = dict(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0)


def coarse_by_blocks(q, k, v, bs=64):
    """Whole-sequence block means (last block short), softmax over all blocks, each token its block's row."""
    B, N, H, D = q.shape
    out = torch.empty_like(q)
    bounds = [(s, min(s + bs, N)) for s in range(0, N, bs)]
    qm, km, vm = ([x[:, a:b].mean(1) for a, b in bounds] for x in (q, k, v))
    km, vm = torch.stack(list(km), 1), torch.stack(list(vm), 1)  # [B, nb, H, D]
    for (a, b), qb in zip(bounds, qm):  # qb [B, H, D]
        p = torch.softmax(torch.einsum("bhd,bjhd->bhj", qb, km) / math.sqrt(D), -1)
        out[:, a:b] = torch.einsum("bhj,bjhd->bhd", p, vm)[:, None]
    return out


def qkv(gen, B=2, N=200, H=2, D=32):
    return [torch.randn(B, N, H, D, generator=gen) for _ in range(3)]


# ---------------------------------------------------------------------------------------- isa_attention
def test_isa_attention_adds_the_gated_residual_on_every_path(rng):
    q, k, v = qkv(rng)
    gate = (torch.rand(2, 200, generator=rng) - 0.5) * 0.5
    coarse = coarse_by_blocks(q, k, v) * gate[..., None, None]
    layout = Layout([("target", 96), ("context", 104)])
    cfg = ISAConfig(block_size=16)
    # ISA (reference route on the CPU) at aligned sizes, and with a ragged boundary
    for lay in (layout, Layout([("target", 90), ("context", 110)])):
        out, info = isa_attention(q, k, v, lay, cfg, residual_gate=gate, return_info=True)
        assert info.used_isa and info.backend == "reference"
        assert (out - (isa_attention(q, k, v, lay, cfg) + coarse)).abs().max() <= 1e-5
    # all ratios 1: ISA + gate is dense + gate
    exact = isa_attention(q, k, v, layout, ISAConfig(block_size=16, **EXACT), residual_gate=gate[..., None])
    assert (exact - (dense_attention(q, k, v) + coarse)).abs().max() <= 1e-5
    # dense fallback (a single block) keeps the residual
    out, info = isa_attention(q, k, v, Layout([("target", 200)]), ISAConfig(block_size=256), residual_gate=gate, return_info=True)
    assert not info.used_isa
    assert (out - (dense_attention(q, k, v) + coarse)).abs().max() <= 1e-5
    # one layout per batch entry
    out = isa_attention(q, k, v, [layout, layout], cfg, residual_gate=gate)
    assert (out - (isa_attention(q, k, v, layout, cfg) + coarse)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="residual_gate has shape"):
        isa_attention(q, k, v, layout, cfg, residual_gate=gate[:, :10])


def test_residual_gate_compiles_without_graph_breaks(rng):
    q, k, v = qkv(rng, B=1, N=150)
    gate = torch.rand(1, 150, 1, generator=rng) - 0.5
    layout, cfg = Layout([("target", 70), ("context", 80)]), ISAConfig(block_size=16)

    def f(q, k, v, g):
        return isa_attention(q, k, v, layout, cfg, residual_gate=g)

    explain = torch._dynamo.explain(f)(q, k, v, gate)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, gate)
    assert (compiled - f(q, k, v, gate)).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------- family
def tiny_model(seed=0, layers=2):
    torch.manual_seed(seed)
    return LIVEditorTransformer3DModel(num_layers=layers, num_attention_heads=2, attention_head_dim=32, text_dim=16,
                                       ffn_dim=64, freq_dim=32).eval()


def tiny_inputs(gen, frames=3, source_frames=3, h=8, w=14):
    return (torch.randn(2, 16, frames, h, w, generator=gen), torch.tensor([600.0, 600.0]),
            torch.randn(2, 5, 16, generator=gen), torch.randn(1, 16, source_frames, h, w, generator=gen))


def test_apply_isa_serves_liveditor_with_the_gate(rng):
    model = tiny_model()
    x, t, text, src = tiny_inputs(rng)  # 3 frames of 4 x 7 tokens: 84 target + 84 source tokens
    with torch.no_grad():
        dense = model(x, t, text, src).sample
    apply_isa(model, ISAConfig(block_size=16, **EXACT))
    assert all(type(b.attn1.processor) is LIVEditorISAAttnProcessor for b in model.blocks)
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    layouts = []
    with torch.no_grad(), observe_attention(model, lambda name, q, k, v, layout, step: layouts.append(layout), dense=False):
        exact = model(x, t, text, src).sample
    assert set(layouts) == {Layout([("target", 84), ("context", 84)])}
    assert (exact - dense).abs().max() <= 1e-5  # ISA with all ratios 1 + gate = the model's dense output
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(model).values())
    remove_isa(model)
    assert all(type(b.attn1.processor).__name__ == "LIVEditorAttnProcessor" for b in model.blocks)

    # default ratios: a different (sparse) output; dense-forced calls give dense + gate, counted as fallbacks
    apply_isa(model, ISAConfig(block_size=16))
    with torch.no_grad():
        sparse = model(x, t, text, src).sample
    assert (sparse - dense).abs().max() > 1e-4
    isa_plugin.adapters.reset_stats(model)
    with torch.no_grad(), observe_attention(model, lambda *a: None, dense=True):  # calibration's dense runs
        fallback = model(x, t, text, src).sample
    assert (fallback - dense).abs().max() <= 1e-5
    assert [s["reasons"] for s in stats(model).values()] == [{"dense mode": 1}] * 2


def test_sequence_blocking_layout(rng):
    assert liveditor_layout(32760, 32760, 64, blocking="sequence") == Layout([("target", 32768), ("context", 32752)])
    assert liveditor_layout(84, 84, 16) == Layout([("target", 84), ("context", 84)])
    with pytest.raises(ValueError, match="blocking"):
        LIVEditorLayout(blocking="whole")
    model = tiny_model(layers=1)
    x, t, text, src = tiny_inputs(rng)
    apply_isa(model, ISAConfig(block_size=16), layout=LIVEditorLayout(blocking="sequence", block_size=16))
    layouts = []
    with torch.no_grad(), observe_attention(model, lambda name, q, k, v, layout, step: layouts.append(layout), dense=False):
        model(x, t, text, src)
    assert layouts == [Layout([("target", 96), ("context", 72)])]


def test_stock_wan_gets_no_gate():
    from diffusers import WanTransformer3DModel

    stock = WanTransformer3DModel(num_layers=1, num_attention_heads=2, attention_head_dim=32, text_dim=16, ffn_dim=64, freq_dim=32)
    apply_isa(stock, ISAConfig(block_size=16))
    proc = stock.blocks[0].attn1.processor
    assert type(proc).__name__ == "WanISAAttnProcessor"
    assert proc.residual_gate(stock.blocks[0].attn1, torch.randn(1, 4, 64)) is None


def test_processor_signature_matches_the_models_own():
    import inspect

    from isa_plugin.pipelines.liveditor import LIVEditorAttnProcessor

    assert list(inspect.signature(LIVEditorISAAttnProcessor.__call__).parameters) == list(
        inspect.signature(LIVEditorAttnProcessor.__call__).parameters
    )
