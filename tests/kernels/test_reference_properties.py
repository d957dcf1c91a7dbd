"""More hypothesis properties of the reference: batch entries are planned independently, shared plans
(``share_plan``) are one plan for the batch, and non-finite inputs behave like dense attention."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isa_plugin import isa_attention
from isa_plugin.attention import dense_attention
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference, pool_blocks
from isa_plugin.selection import plan_from_pooled
from test_attention_properties import problems

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problems())
def test_batch_equals_separate_entries(p):
    q, k, v, layout, cfg = p
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    for i in range(q.shape[0]):
        o, pl = isa_attention_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], layout, cfg, return_plan=True)
        assert torch.equal(pl.exact_mask(), plan.exact_mask()[i : i + 1])
        assert (o - out[i : i + 1]).abs().max().item() <= 1e-12


@SETTINGS
@given(problems())
def test_share_plan_is_the_plan_of_the_batch_mean(p):
    q, k, v, layout, cfg = p
    shared = cfg.replace(share_plan=True)
    out, plan = isa_attention_reference(q, k, v, layout, shared, return_plan=True)
    assert torch.isfinite(out).all()
    blocks = layout.blocks(cfg.block_size)
    scale = q.shape[-1] ** -0.5
    mean = plan_from_pooled(cfg.selection, pool_blocks(q, blocks).mean(0, keepdim=True), pool_blocks(k, blocks).mean(0, keepdim=True),
                            blocks, cfg.settings, scale, cfg.share_plan)
    for i in range(q.shape[0]):
        assert torch.equal(plan.exact_mask()[i], mean.exact_mask()[0]) and torch.equal(plan.kv_keep[i], mean.kv_keep[0])
    if q.shape[0] == 1:
        assert torch.equal(out, isa_attention_reference(q, k, v, layout, cfg))
    ones = shared.replace(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0)
    assert (isa_attention_reference(q, k, v, layout, ones) - dense_attention_reference(q, k, v)).abs().max().item() <= 1e-10


@SETTINGS
@given(problems(), st.sampled_from(["q", "k", "v"]), st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.data())
def test_non_finite_input_is_non_finite_where_dense_is(p, which, value, data):
    q, k, v, layout, cfg = p
    B, N, H, D = q.shape
    b, n, h, d = (data.draw(st.integers(0, x - 1)) for x in (B, N, H, D))
    clean = isa_attention(q, k, v, layout, cfg)
    dict(q=q, k=k, v=v)[which][b, n, h, d] = value
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    # calls too short for ISA run torch SDPA, whose CPU kernel may turn a NaN score row into zeros
    dense = dense_attention_reference(q, k, v) if info.used_isa else dense_attention(q, k, v)
    assert not (~dense.isfinite() & out.isfinite()).any()
    # every other (batch, head) is untouched
    keep = torch.ones(B, H, dtype=torch.bool)
    keep[b, h] = False
    assert torch.equal(out.permute(0, 2, 1, 3)[keep], clean.permute(0, 2, 1, 3)[keep])
