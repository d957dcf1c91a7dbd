"""Classifier-free guidance: a cond/uncond batch of 2 gets independent selections per entry (the same
result as running the two entries separately), or, with ``ISAConfig(share_plan=True)``, one plan from
the batch mean of the block means used for both."""

import pytest
import torch

from rel_helpers import EXACT, SPARSE, qkv
from isa_plugin import ISAConfig, Layout, isa_attention
from isa_plugin.executors.reference import isa_attention_reference, plan_reference
from isa_plugin.kernels.reference import dense_attention_reference, execute_plan_reference, pool_blocks
from isa_plugin.selection import plan_from_pooled

LAYOUT = Layout([("target", 150), ("text", 9), ("context", 130)])
CFG = ISAConfig(alpha_s=0.4, alpha_f=0.4, alpha_ns=0.2, block_size=16)


def _cfg_pair(seed=0, H=3, D=16):
    """q, k, v of a cond/uncond pair: shared structure plus a per-entry difference."""
    base = qkv(1, LAYOUT.num_tokens, H, D, seed=seed, dtype=torch.float64)
    diff = qkv(2, LAYOUT.num_tokens, H, D, seed=seed + 1, dtype=torch.float64, scale=0.7)
    return [b + d for b, d in zip(base, diff)]


def test_batch_entries_planned_independently_equal_separate_runs():
    q, k, v = _cfg_pair()
    out, plan = isa_attention_reference(q, k, v, LAYOUT, CFG, return_plan=True)
    for i in range(2):
        sep, plan_i = isa_attention_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], LAYOUT, CFG, return_plan=True)
        assert torch.equal(plan.exact_mask()[i : i + 1], plan_i.exact_mask())
        assert torch.equal(plan.kv_keep[i : i + 1], plan_i.kv_keep)
        assert (out[i : i + 1] - sep).abs().max().item() <= 1e-12
    # the two entries really differ (otherwise the test proves nothing)
    assert not torch.equal(plan.exact_mask()[0], plan.exact_mask()[1])


def test_public_entry_point_batch_two_equals_separate_calls():
    q, k, v = (x.float() for x in _cfg_pair(seed=3))
    out = isa_attention(q, k, v, LAYOUT, CFG)
    sep = torch.cat([isa_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], LAYOUT, CFG) for i in range(2)])
    assert (out - sep).abs().max().item() <= 1e-5


def test_share_plan_config_roundtrip_and_validation():
    c = CFG.replace(share_plan=True)
    assert c.share_plan is True and c.to_dict()["share_plan"] is True
    assert ISAConfig.from_dict(c.to_dict()) == c
    assert ISAConfig.decode(c.encode()) == c and c.encode() != CFG.encode()
    d = CFG.to_dict()
    d.pop("share_plan")
    assert ISAConfig.from_dict(d).share_plan is False  # dicts written before the option still load
    with pytest.raises(TypeError, match="share_plan"):
        ISAConfig(share_plan="yes")


def test_share_plan_batch_one_equals_no_sharing():
    q, k, v = _cfg_pair(seed=5)
    q, k, v = q[:1], k[:1], v[:1]
    a, pa = isa_attention_reference(q, k, v, LAYOUT, CFG, return_plan=True)
    b, pb = isa_attention_reference(q, k, v, LAYOUT, CFG.replace(share_plan=True), return_plan=True)
    assert torch.equal(pa.exact_mask(), pb.exact_mask()) and torch.equal(a, b)


def test_share_plan_batch_two_uses_one_plan_from_batch_means():
    q, k, v = _cfg_pair(seed=7)
    cfg = CFG.replace(share_plan=True)
    out, plan = isa_attention_reference(q, k, v, LAYOUT, cfg, return_plan=True)
    for f in ("kv_keep", "full_rows", "exact_mask"):
        t = getattr(plan, f)
        t = t() if callable(t) else t
        assert t.shape[0] == 2 and torch.equal(t[0], t[1]), f
    # the shared plan is the plan of the batch-mean block means
    blocks = LAYOUT.blocks(cfg.block_size)
    mean_plan = plan_from_pooled(CFG.selection, pool_blocks(q, blocks).mean(0, keepdim=True),
                                 pool_blocks(k, blocks).mean(0, keepdim=True), blocks, CFG.settings, q.shape[-1] ** -0.5)
    assert torch.equal(plan.exact_mask()[:1], mean_plan.exact_mask()) and torch.equal(plan.kv_keep[:1], mean_plan.kv_keep)
    # each entry is executed with its own tokens and pseudo-keys on that plan
    for i in range(2):
        single = execute_plan_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], mean_plan)
        assert (out[i : i + 1] - single).abs().max().item() <= 1e-12
    # and it differs from independent planning here
    assert not torch.equal(plan.exact_mask(), plan_reference(q, k, LAYOUT, CFG).exact_mask())


def test_share_plan_all_ones_is_dense():
    q, k, v = _cfg_pair(seed=9)
    cfg = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=16, share_plan=True)
    out = isa_attention_reference(q, k, v, LAYOUT, cfg)
    assert (out - dense_attention_reference(q, k, v)).abs().max().item() <= 1e-12


def test_share_plan_through_public_entry_point():
    q, k, v = (x.float() for x in _cfg_pair(seed=11))
    cfg = CFG.replace(share_plan=True)
    out, info = isa_attention(q, k, v, LAYOUT, cfg, return_info=True)
    assert info.used_isa and info.backend == "reference"
    ref = isa_attention_reference(q, k, v, LAYOUT, cfg)
    assert (out - ref).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- transformer level (tiny Wan, CFG batch)
def _cond_uncond(wan_kit, frames=4):
    x = wan_kit.wan_inputs(frames=frames, batch=1)
    g = torch.Generator().manual_seed(5)
    pair = dict(
        hidden_states=x["hidden_states"].repeat(2, 1, 1, 1, 1),  # CFG: same latents, different text
        timestep=x["timestep"].repeat(2),
        encoder_hidden_states=torch.cat([x["encoder_hidden_states"], torch.randn(1, 12, 16, generator=g)]),
    )
    return pair


def _entry(inputs, i):
    return {n: t[i : i + 1] for n, t in inputs.items()}


@pytest.mark.parametrize("cfg", [SPARSE, EXACT], ids=["sparse", "exact"])
def test_transformer_cfg_batch_equals_separate_entries(wan_kit, cfg):
    from isa_plugin import apply_isa, stats
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = wan_kit.wan(num_layers=2)
    pair = _cond_uncond(wan_kit)
    dense = wan_kit.run(t, pair)
    apply_isa(t, cfg, layout=WanICLLayout(2))
    out = wan_kit.run(t, pair)
    sep = torch.cat([wan_kit.run(t, _entry(pair, i)) for i in range(2)])
    assert (out - sep).abs().max().item() <= 1e-4
    assert all(s["isa_calls"] == 3 and s["fallbacks"] == 0 for s in stats(t).values())
    if cfg is EXACT:
        assert (out - dense).abs().max().item() <= 1e-4
    else:
        assert not torch.allclose(out, dense, atol=1e-6)  # ISA really ran sparse


def test_transformer_share_plan(wan_kit):
    from isa_plugin import apply_isa, stats
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = wan_kit.wan(num_layers=2)
    pair = _cond_uncond(wan_kit)
    dense = wan_kit.run(t, pair)
    apply_isa(t, SPARSE.replace(share_plan=True), layout=WanICLLayout(2))
    shared = wan_kit.run(t, pair)
    assert torch.isfinite(shared).all()
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(t).values())
    # one entry alone: sharing over a batch of one is independent planning
    from isa_plugin import remove_isa

    single = wan_kit.run(t, _entry(pair, 0))
    remove_isa(t)
    apply_isa(t, SPARSE, layout=WanICLLayout(2))
    assert (single - wan_kit.run(t, _entry(pair, 0))).abs().max().item() <= 1e-5
    remove_isa(t)
    apply_isa(t, EXACT.replace(share_plan=True), layout=WanICLLayout(2))
    assert (wan_kit.run(t, pair) - dense).abs().max().item() <= 1e-4
