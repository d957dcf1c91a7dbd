"""The PyTorch reference of ISA against an independent loop-based restatement and exactness anchors."""

import math

import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.executors.reference import isa_attention_reference, plan_reference
from isa_plugin.kernels.reference import dense_attention_reference, execute_plan_reference, pool_blocks
from naive_isa import naive_isa

LAYOUTS = [
    [("target", 100), ("context", 90)],
    [("context", 70), ("target", 65)],  # conditions prepended (LTX)
    [("text", 13), ("target", 50), ("context", 47)],  # Flux Kontext order
    [("target", 40), ("context", 33), ("context", 1), ("text", 9)],  # several context spans, a 1-token span
    [("target", 1), ("context", 30), ("target", 45)],
    [("target", 96)],  # no context at all
]


def _qkv(rng, B, N, H, D, dtype=torch.float64, scale=1.0):
    return [torch.randn(B, N, H, D, generator=rng, dtype=dtype) * scale for _ in range(3)]


@pytest.mark.parametrize("spans", LAYOUTS)
def test_all_ones_is_dense(rng, spans):
    layout = Layout(spans)
    q, k, v = _qkv(rng, 2, layout.num_tokens, 3, 16, scale=2.0)
    out = isa_attention_reference(q, k, v, layout, ISAConfig(alpha_s=1, alpha_f=1, alpha_ns=1, block_size=16))
    dense = dense_attention_reference(q, k, v)
    assert (out - dense).abs().max().item() <= 1e-10


@pytest.mark.parametrize("spans", LAYOUTS)
@pytest.mark.parametrize("sharpness", ["topk_mass", "l2"])
def test_matches_independent_restatement(rng, spans, sharpness):
    layout = Layout(spans)
    q, k, v = _qkv(rng, 2, layout.num_tokens, 2, 8, scale=1.5)
    ratios = dict(alpha_s=0.3, alpha_f=0.4, alpha_ns=0.25)
    out = isa_attention_reference(q, k, v, layout, ISAConfig(**ratios, block_size=8, sharpness=sharpness))
    ref = naive_isa(q, k, v, spans, b=8, sharpness=sharpness, **ratios)
    assert (out - ref).abs().max().item() <= 1e-10


def test_per_head_ratios_match_restatement(rng):
    spans = [("target", 70), ("context", 61), ("text", 5)]
    layout = Layout(spans)
    q, k, v = _qkv(rng, 1, layout.num_tokens, 3, 8)
    ratios = dict(alpha_s=[0.1, 0.5, 1.0], alpha_f=[0.2, 1.0, 0.5], alpha_ns=[0.1, 0.3, 1.0])
    out = isa_attention_reference(q, k, v, layout, ISAConfig(**ratios, block_size=8))
    ref = naive_isa(q, k, v, spans, b=8, **ratios)
    assert (out - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("spans", LAYOUTS[:4])
def test_alpha_ns_one_is_masked_dense_over_kv_prime(rng, spans):
    layout = Layout(spans)
    q, k, v = _qkv(rng, 2, layout.num_tokens, 2, 16, scale=2.0)
    cfg = ISAConfig(alpha_s=0.25, alpha_f=0.3, alpha_ns=1.0, block_size=16)
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    # independent masked dense: every query attends exactly to the tokens of the kept blocks
    token_keep = plan.kv_keep[:, :, plan.blocks.token_block]  # [B, H, N]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16)
    s = s.masked_fill(~token_keep[:, :, None, :], float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    assert (out - ref).abs().max().item() <= 1e-10
    # and the kept set is what the rules say: all target/text blocks, ceil(alpha_s * C) context blocks
    kinds = plan.blocks.kinds
    assert plan.kv_keep[..., kinds != 1].all()
    n_ctx = int((kinds == 1).sum())
    assert ((plan.kv_keep & (kinds == 1)).sum(-1) == math.ceil(0.25 * n_ctx)).all()


def test_counts_follow_the_rules(rng):
    layout = Layout([("text", 20), ("target", 160), ("context", 150)])
    q, k, v = _qkv(rng, 1, layout.num_tokens, 2, 8)
    cfg = ISAConfig(alpha_s=0.2, alpha_f=0.5, alpha_ns=0.25, block_size=16)
    _, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    kinds = plan.blocks.kinds
    n_t, n_c, n_x = (int((kinds == i).sum()) for i in range(3))
    assert (n_t, n_c, n_x) == (10, 10, 2)
    assert ((plan.kv_keep & (kinds == 1)).sum(-1) == 2).all()
    # text query blocks always exact; ceil(0.5 * 20) of the non-text ones
    assert plan.full_rows[..., kinds == 2].all()
    assert (plan.full_rows[..., kinds != 2].sum(-1) == 10).all()
    taylor = ~plan.full_rows
    kprime = 10 + 2  # target blocks + kept context blocks (non-text)
    n_sel = (plan.exact_mask() & (kinds != 2)).sum(-1)
    assert (n_sel[taylor] == math.ceil(0.25 * kprime)).all()
    # text key blocks never dropped and never approximated
    assert plan.exact_mask()[..., kinds == 2].all()
    assert not plan.approx_mask()[..., kinds == 2].any()


def test_sharp_query_block_goes_exact(rng):
    layout = Layout([("target", 128), ("context", 128)])
    B, N, H, D = 1, 256, 1, 16
    q = torch.randn(B, N, H, D, generator=rng, dtype=torch.float64) * 0.05
    k = torch.randn(B, N, H, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, N, H, D, generator=rng, dtype=torch.float64)
    # query block 5 (tokens 80..95) points hard at key block 2's mean: a peaked pooled row
    kbar2 = k[0, 32:48, 0].mean(0)
    q[0, 80:96, 0] = 40 * kbar2 / kbar2.norm()
    for metric in ("topk_mass", "l2"):
        cfg = ISAConfig(alpha_s=0.5, alpha_f=1 / 16, alpha_ns=0.25, block_size=16, sharpness=metric)
        _, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
        assert plan.full_rows[0, 0].nonzero().flatten().tolist() == [5]
        assert plan.diagnostics["sharpness"][0, 0].argmax().item() == 5


def test_ragged_blocks_never_straddle_spans():
    layout = Layout([("target", 32760), ("context", 32760)])
    blocks = layout.blocks(64)
    assert blocks.num_blocks == 2 * 512
    assert blocks.counts.sum().item() == 65520
    ends = blocks.starts + blocks.counts
    # each block lies inside one span: target blocks end by 32760, context blocks start at or after it
    assert (ends[blocks.kinds == 0] <= 32760).all() and (blocks.starts[blocks.kinds == 1] >= 32760).all()
    assert blocks.counts[511].item() == 32760 - 511 * 64 == 56
    # every token in exactly one block: no token can appear twice in KV'
    cover = torch.zeros(65520, dtype=torch.int64)
    for s, n in zip(blocks.starts.tolist(), blocks.counts.tolist()):
        cover[s : s + n] += 1
    assert (cover == 1).all()
    assert torch.equal(blocks.token_block, torch.repeat_interleave(torch.arange(1024), blocks.counts))


def test_true_counts_weight_means(rng):
    layout = Layout([("target", 19), ("context", 9), ("text", 1)])
    blocks = layout.blocks(8)
    assert blocks.counts.tolist() == [8, 8, 3, 8, 1, 1]
    x = torch.randn(1, 29, 1, 4, generator=rng, dtype=torch.float64)
    pooled = pool_blocks(x, blocks)
    assert torch.allclose(pooled[0, 0, 2], x[0, 16:19, 0].mean(0))
    assert torch.allclose(pooled[0, 0, 4], x[0, 27, 0])
    # the ln(n) bias: a Taylor row computed by hand for one approximated short block
    spans = [("target", 19), ("context", 9)]
    layout = Layout(spans)
    q, k, v = _qkv(rng, 1, 28, 1, 4)
    cfg = ISAConfig(alpha_s=1.0, alpha_f=0.2, alpha_ns=0.2, block_size=8)
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    i = int((~plan.full_rows[0, 0]).nonzero()[0])
    t = int(plan.blocks.starts[i])
    ex = plan.exact_mask()[0, 0, i]
    ap = plan.approx_mask()[0, 0, i]
    tok = ex[plan.blocks.token_block]
    kb, vb = pool_blocks(k, plan.blocks)[0, 0], pool_blocks(v, plan.blocks)[0, 0]
    w_ex = torch.exp(k[0, tok, 0] @ q[0, t, 0] / 2)
    w_ap = plan.blocks.counts[ap].double() * torch.exp(kb[ap] @ q[0, t, 0] / 2)
    hand = (w_ex @ v[0, tok, 0] + w_ap @ vb[ap]) / (w_ex.sum() + w_ap.sum())
    assert torch.allclose(out[0, t, 0], hand, atol=1e-12)


def test_one_token_spans(rng):
    layout = Layout([("target", 1), ("context", 1)])
    q, k, v = _qkv(rng, 1, 2, 2, 8)
    out = isa_attention_reference(q, k, v, layout, ISAConfig(block_size=64))
    # two 1-token blocks; the context block is kept (ceil(0.125) = 1); everything exact
    assert torch.allclose(out, dense_attention_reference(q, k, v), atol=1e-12)


def test_batch_and_heads_independent(rng):
    layout = Layout([("target", 80), ("context", 80)])
    q, k, v = _qkv(rng, 3, 160, 4, 8)
    cfg = ISAConfig(alpha_s=0.2, alpha_f=0.3, alpha_ns=0.2, block_size=8)
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    for b in range(3):
        ob, pb = isa_attention_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], layout, cfg, return_plan=True)
        assert torch.equal(pb.exact_mask()[0], plan.exact_mask()[b])
        assert (ob[0] - out[b]).abs().max().item() <= 1e-12
        for h in range(4):
            oh = isa_attention_reference(q[b : b + 1, :, h : h + 1], k[b : b + 1, :, h : h + 1], v[b : b + 1, :, h : h + 1], layout, cfg)
            assert (oh[0, :, 0] - out[b, :, h]).abs().max().item() <= 1e-12
    # selections really differ across batch entries and heads on random data
    flat = plan.exact_mask().flatten(2)
    assert len({tuple(x.tolist()) for x in flat.reshape(-1, flat.shape[-1])}) > 1


def test_execute_given_plan_and_dtypes(rng):
    layout = Layout([("target", 50), ("context", 50)])
    q, k, v = _qkv(rng, 1, 100, 2, 8, dtype=torch.float32)
    cfg = ISAConfig(block_size=8)
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    assert out.dtype == torch.float32
    assert torch.equal(execute_plan_reference(q, k, v, plan), out)
    out16 = isa_attention_reference(q.half(), k.half(), v.half(), layout, cfg, plan=plan)
    assert out16.dtype == torch.float16
    assert (out16.float() - out).abs().max() < 1e-2


def test_relative_cost(rng):
    layout = Layout([("target", 256), ("context", 256)])
    q, k, v = _qkv(rng, 1, 512, 2, 8)
    _, dense_plan = isa_attention_reference(q, k, v, layout, ISAConfig(alpha_s=1, alpha_f=1, alpha_ns=1, block_size=16), return_plan=True)
    assert dense_plan.relative_cost() == pytest.approx(1.0)
    _, plan = isa_attention_reference(q, k, v, layout, ISAConfig(block_size=16), return_plan=True)
    # ISA.md §2 estimate (α_f + (1-α_f)(α_ns + 1/b))·(0.5 + 0.5 α_s) with b = #blocks granularity
    assert 0.2 < plan.relative_cost() < 0.45


def test_nan_propagates_like_dense(rng):
    layout = Layout([("target", 64), ("context", 64)])
    q, k, v = _qkv(rng, 1, 128, 2, 8)
    cfg = ISAConfig(block_size=16)
    qn = q.clone()
    qn[0, 5, 0, 3] = float("nan")
    out = isa_attention_reference(qn, k, v, layout, cfg)
    assert torch.isnan(out[0, 5, 0]).all()
    assert torch.isfinite(out[0, :, 1]).all()  # the other head is untouched, as in dense attention
    for name, t in (("k", k), ("v", v)):
        bad = t.clone()
        bad[0, 100, 1, 0] = float("nan")  # a context token (its block may be dropped)
        args = dict(q=q, k=k, v=v)
        args[name] = bad
        out = isa_attention_reference(args["q"], args["k"], args["v"], layout, cfg)
        dense = dense_attention_reference(args["q"], args["k"], args["v"])
        assert torch.equal(torch.isnan(out), torch.isnan(dense))
