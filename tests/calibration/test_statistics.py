"""The calibration estimator against the reference ISA, and the statistics container."""

import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.calibration.statistics import CalibrationStats, Grid
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference
from isa_plugin.selection.fixed_measure import measure_fixed_call
from isa_plugin.selection.measure import Sampler

GRID = Grid(alpha_s=(0.25, 0.5, 1.0), alpha_f=(0.25, 0.5, 1.0), alpha_ns=(0.2, 0.5))
FIXED = GRID.modes["fixed"]


def measure_call(q, k, v, layout, grid, *, blocks_per_kind=48, tokens_per_block=16, generator=None, **kw):
    """The fixed mode's statistics of one call (a dict of tensors)."""
    return measure_fixed_call(q, k, v, layout, grid.modes["fixed"], sampler=Sampler(blocks_per_kind, tokens_per_block, generator),
                              **kw)


def errors(stats):
    """[2, M, S, F, NS] layer-level relative L1 (summed over heads) per query kind, from the fixed mode's tensors."""
    return stats["num"].sum(0) / stats["den"].sum(0).view(2, 1, 1, 1, 1)

LAYOUTS = [
    [("target", 200), ("context", 190)],
    [("context", 100), ("target", 130), ("text", 20), ("context", 70)],
    [("target", 64), ("context", 64)],
]


def _errors(q, k, v, layout, cfg, bs):
    o = isa_attention_reference(q, k, v, layout, cfg)
    d = dense_attention_reference(q, k, v)
    blocks = layout.blocks(bs)
    kinds = blocks.kinds[blocks.token_block]
    out = []
    for kind in (0, 1):
        sel = kinds == kind
        out.append((o - d)[0, sel].abs().sum((0, 2)) / d[0, sel].abs().sum((0, 2)))
    return out  # per head


@pytest.mark.parametrize("spans", LAYOUTS)
def test_full_sampling_equals_reference(spans, rng):
    """With every block and token sampled the estimate is the exact ISA error of every grid setting."""
    layout = Layout(spans)
    N, H, D, bs = layout.num_tokens, 3, 16, 16
    q = torch.randn(1, N, H, D, generator=rng, dtype=torch.float64) * 1.5
    k = torch.randn(1, N, H, D, generator=rng, dtype=torch.float64) * 1.5
    v = torch.randn(1, N, H, D, generator=rng, dtype=torch.float64)
    st = measure_call(q, k, v, layout, GRID, block_size=bs, blocks_per_kind=10_000, tokens_per_block=bs, generator=rng)
    for mi, metric in enumerate(FIXED.metrics):
        for si, a_s in enumerate(FIXED.alpha_s):
            for fi, a_f in enumerate(FIXED.alpha_f):
                for ni, a_ns in enumerate(FIXED.alpha_ns):
                    cfg = ISAConfig(alpha_s=a_s, alpha_f=a_f, alpha_ns=a_ns, block_size=bs, sharpness=metric, backend="reference")
                    ref = _errors(q, k, v, layout, cfg, bs)
                    for kind in (0, 1):
                        est = st["num"][:, kind, mi, si, fi, ni] / st["den"][:, kind]
                        torch.testing.assert_close(est, ref[kind], atol=1e-9, rtol=1e-9)
    # pruning-only errors are the alpha_f = 1 column; Taylor-only at the largest alpha_s
    torch.testing.assert_close(st["prune_num"], st["num"][:, :, 0, :, -1, 0])


def test_head_groups_and_chunks_do_not_change_the_statistics(rng):
    """A tight transient-memory bound splits the work into single heads and small chunks of sampled blocks:
    the statistics are those of the one-pass computation."""
    layout = Layout(LAYOUTS[1])
    N, H, D, bs = layout.num_tokens, 3, 16, 16
    q, k, v = (torch.randn(1, N, H, D, generator=rng, dtype=torch.float64) for _ in range(3))
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    whole = measure_call(q, k, v, layout, GRID, block_size=bs, generator=torch.Generator().manual_seed(seed))
    split = measure_call(q, k, v, layout, GRID, block_size=bs, generator=torch.Generator().manual_seed(seed), max_chunk_elems=1)
    for name in ("num", "den", "prune_num", "taylor_num"):
        torch.testing.assert_close(split[name], whole[name], atol=1e-12, rtol=1e-12)


def test_sampled_estimate_is_close(rng):
    from isa_plugin.calibration.synthetic import SyntheticModel, SyntheticSpec

    model = SyntheticModel(SyntheticSpec(frames=2, height=16, width=16, heads=4, layers=2), seed=1)
    q, k, v, layout = model.sample(1, 3)
    full = measure_call(q, k, v, layout, GRID, blocks_per_kind=10_000, tokens_per_block=64, generator=rng)
    part = CalibrationStats(GRID, blocks_per_kind=6, tokens_per_block=16, seed=0)
    for _ in range(6):
        part.observe("l", q, k, v, layout)
    e_full, e_part = errors(full), errors(part.get("l").modes["fixed"])
    # ratio estimates from ~1/3 of the blocks and 1/4 of their tokens: within 25% (relative) or 0.01
    assert ((e_full - e_part).abs() <= 0.25 * e_full + 0.01).all()


def test_observe_batches_buckets_and_state_dict(rng):
    layout = Layout([("target", 96), ("context", 96)])
    q, k, v = (torch.randn(2, 192, 2, 16, generator=rng) for _ in range(3))
    st = CalibrationStats(GRID, block_size=32, timestep_edges=(500.0,), blocks_per_kind=2, tokens_per_block=4)
    st.observe("blocks.0.attn1", q, k, v, layout, timestep=torch.tensor([900.0, 900.0]))
    st.observe("blocks.0.attn1", q, k, v, [layout, layout], timestep=torch.tensor([100.0, 100.0]))
    st.observe("blocks.0.attn1", q, k, v, None)  # unknown layout: skipped
    assert st.get("blocks.0.attn1", 0).calls == 2 and st.get("blocks.0.attn1", 1).calls == 2
    assert st.meta["calls"] == 4 and st.meta["timesteps"] == [900.0, 100.0]
    again = CalibrationStats.from_state_dict(st.state_dict())
    assert again.layer_names() == ["blocks.0.attn1"]
    torch.testing.assert_close(again.get("blocks.0.attn1", 1).modes["fixed"]["num"], st.get("blocks.0.attn1", 1).modes["fixed"]["num"])
    assert st.get("blocks.0.attn1", 0).mean_tokens() == {"target": 96, "context": 96, "text": 0}


def test_no_context_span():
    layout = Layout([("target", 128)])
    q = k = v = torch.randn(1, 128, 2, 16)
    st = measure_call(q, k, v, layout, GRID, block_size=32)
    assert st["den"][:, 1].sum() == 0 and st["den"][:, 0].sum() > 0


def test_grid_validation():
    with pytest.raises(ValueError):
        Grid(alpha_s=(0.0, 0.5))
    with pytest.raises(ValueError):
        Grid(metrics=("entropy",))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """The estimator on CUDA (bf16 inputs, TF32 matmuls) agrees with the CPU float32 estimate."""
    from isa_plugin.calibration.synthetic import synthetic_qkv

    q, k, v, layout = synthetic_qkv(4, 16, 24, 8, 128, dtype=torch.bfloat16)
    cpu = measure_call(q.float(), k.float(), v.float(), layout, Grid(), generator=torch.Generator().manual_seed(0))
    gpu = measure_call(q.cuda(), k.cuda(), v.cuda(), layout, Grid(), generator=torch.Generator().manual_seed(0))
    gpu = {name: t.to("cpu") for name, t in gpu.items()}
    torch.testing.assert_close(gpu["den"], cpu["den"], rtol=1e-3, atol=0)
    e_cpu, e_gpu = errors(cpu), errors(gpu)
    assert ((e_cpu - e_gpu).abs() <= 0.02 * e_cpu + 2e-3).all()
