"""The adaptive selection mode through ISAConfig and isa_attention (docs/ADAPTIVE.md)."""

import pytest
import torch

from isa_plugin.attention import isa_attention, select_backend
from isa_plugin.config import ISAConfig
from isa_plugin.executors.reference import isa_attention_reference, plan_reference
from isa_plugin.kernels.reference import dense_attention_reference, execute_plan_reference
from isa_plugin.selection.adaptive import AdaptiveGrid, AdaptiveSettings
from isa_plugin.layout import Layout
from naive_isa import naive_pair_counts

LAYOUT = Layout([("target", 70), ("context", 58), ("text", 7)])


def _qkv(rng, B=2, H=3, D=16, dtype=torch.float64):
    N = LAYOUT.num_tokens
    return tuple((2.0 * torch.randn(B, N, H, D, generator=rng, dtype=torch.float64)).to(dtype) for _ in range(3))


def test_config_round_trip_and_fixed_dict_unchanged():
    cfg = ISAConfig(mode="adaptive", mass=(0.8, 0.9, 0.99), min_blocks=(1, 2, 1), max_blocks=3, pseudo_block=16,
                    alpha_s=(0.5, 1.0, 0.25), context_mass=(0.7, 0.9, 1.0))
    assert ISAConfig.decode(cfg.encode()) == cfg
    assert ISAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(mass=0.5).mass == 0.5 and cfg.replace(mass=0.5).mode == "adaptive"
    assert cfg.num_heads == 3
    ph = cfg.per_head(3)
    assert ph["mass"].tolist() == [0.8, 0.9, 0.99] and ph["min_blocks"].dtype == torch.int64
    assert cfg.settings == AdaptiveSettings(mass=(0.8, 0.9, 0.99), min_blocks=(1, 2, 1), max_blocks=3, pseudo_block=16,
                                            alpha_s=(0.5, 1.0, 0.25), context_mass=(0.7, 0.9, 1.0))
    assert ph["context_mass"].tolist() == [0.7, 0.9, 1.0]
    assert ISAConfig(mode="adaptive", mass=0.8).per_head(2)["context_mass"].tolist() == [0.8, 0.8]
    # a fixed-mode config lists neither the mode nor the adaptive settings
    d = ISAConfig().to_dict()
    assert "mode" not in d and "mass" not in d and "pseudo_block" not in d
    assert ISAConfig(mode="adaptive").pseudo_block == 64
    assert ISAConfig(mode="adaptive").pseudo_keys == "mean" and ISAConfig().pseudo_keys == "mean"
    km = ISAConfig(mode="adaptive", pseudo_block=16, pseudo_keys="kmeans")
    assert km.pseudo_keys == "kmeans" and ISAConfig.decode(km.encode()) == km and ISAConfig.from_dict(km.to_dict()) == km
    assert ISAConfig(mode="adaptive", mass=1.0, alpha_s=1.0).is_dense
    assert not ISAConfig(mode="adaptive", mass=0.9, alpha_s=1.0).is_dense


@pytest.mark.parametrize("kw, exc, word", [
    (dict(mode="sparse"), ValueError, "mode"),
    (dict(mass=0.5), ValueError, "mode='adaptive'"),
    (dict(mode="adaptive", mass=1.5), ValueError, "mass"),
    (dict(mode="adaptive", mass="high"), TypeError, "mass"),
    (dict(mode="adaptive", pseudo_block=24), ValueError, "pseudo_block"),
    (dict(mode="adaptive", min_blocks=0), ValueError, "min_blocks"),
    (dict(mode="adaptive", min_blocks=3, max_blocks=2), ValueError, "max_blocks"),
    (dict(mode="adaptive", max_blocks=2.5), TypeError, "max_blocks"),
    (dict(context_mass=0.5), ValueError, "mode='adaptive'"),
    (dict(mode="adaptive", context_mass=0.0), ValueError, "context_mass"),
    (dict(mode="adaptive", pseudo_keys="centroids"), ValueError, "pseudo_keys='centroids' is not supported; supported: 'mean', 'kmeans'"),
    (dict(pseudo_keys="kmeans"), ValueError, "mode='adaptive'"),
])
def test_config_validation(kw, exc, word):
    with pytest.raises(exc, match=word):
        ISAConfig(**kw)


def test_per_head_length_checked_at_the_call(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="mass has 2 per-head values"):
        isa_attention(q, k, v, LAYOUT, ISAConfig(mode="adaptive", mass=(0.5, 0.9), block_size=8))


def test_isa_attention_routes_adaptive_to_the_reference_on_cpu(rng):
    q, k, v = _qkv(rng)
    cfg = ISAConfig(mode="adaptive", mass=(0.6, 0.8, 0.95), pseudo_block=4, alpha_s=0.5, block_size=8)
    out, info = isa_attention(q, k, v, LAYOUT, cfg, return_info=True)
    assert info.used_isa and info.backend == "reference"
    want = execute_plan_reference(q, k, v, plan_reference(q, k, LAYOUT, cfg))
    assert (out - want).abs().max().item() <= 1e-12
    # the reference entry point plans with the config's mode and gives the same
    assert (isa_attention_reference(q, k, v, LAYOUT, cfg) - want).abs().max().item() <= 1e-12
    assert select_backend(q, LAYOUT, cfg).backend == "reference"
    with pytest.raises(RuntimeError, match="FlexAttention"):
        select_backend(q, LAYOUT, cfg.replace(backend="flex"))
    # inside a model on the CPU the reference serves it too
    assert select_backend(q.float(), LAYOUT, cfg, in_model=True).backend == "reference"


def test_fixed_plan_pair_counts(rng):
    q, k, v = _qkv(rng)
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.25, alpha_ns=0.25, block_size=8)
    plan = plan_reference(q, k, LAYOUT, cfg)
    B, H, _ = plan.kv_keep.shape
    exact, approx = naive_pair_counts(plan, LAYOUT.blocks(8).counts.tolist(), 8)  # one pseudo-key per block
    assert plan.pair_counts() == (exact, approx)
    N = LAYOUT.num_tokens
    assert plan.relative_cost() == pytest.approx((exact + approx) / (N * N * B * H), rel=1e-12)


def test_kmeans_pseudo_keys_anchors(rng):
    """One slot per block is the block mean for either kind; one token per slot is attention over KV'; k-means
    plans have no finer blocking; the grid checks its kinds."""
    layout = Layout([("target", 70), ("context", 58)])
    q, k, v = (torch.randn(1, 128, 2, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    for s, dense in ((16, False), (1, True)):
        km = isa_attention_reference(q, k, v, layout, ISAConfig(mode="adaptive", mass=0.5, alpha_s=1.0, block_size=16,
                                                                pseudo_block=s, pseudo_keys="kmeans"))
        other = (dense_attention_reference(q, k, v) if dense else
                 isa_attention_reference(q, k, v, layout, ISAConfig(mode="adaptive", mass=0.5, alpha_s=1.0, block_size=16)))
        assert (km - other).abs().max().item() <= 1e-12
    plan = plan_reference(q, k, layout, ISAConfig(mode="adaptive", mass=0.5, block_size=16, pseudo_block=4, pseudo_keys="kmeans"))
    assert plan.pseudo_keys == "kmeans" and not plan.mean_pseudo_keys
    with pytest.raises(ValueError, match="no finer blocking"):
        plan.at_pseudo_granularity()
    with pytest.raises(ValueError, match="Grid.pseudo_keys='medoids' is not supported"):
        AdaptiveGrid(pseudo_keys=("medoids",))
    with pytest.raises(ValueError, match="Grid.pseudo_keys is empty"):
        AdaptiveGrid(pseudo_keys=())
    assert AdaptiveGrid(pseudo_block=(16, 64), pseudo_keys=("mean", "kmeans")).pseudo_variants == (
        (16, "mean"), (16, "kmeans"), (64, "mean"), (64, "kmeans"))
