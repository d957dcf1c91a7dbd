"""The structured synthetic workload, and the held-out check of calibration on it."""

import math

import pytest
import torch

from isa_plugin import ISAConfig
from isa_plugin.calibration.fit import fit_profile
from isa_plugin.calibration.synthetic import (SyntheticModel, SyntheticSpec, calibrate_synthetic, evaluate_synthetic,
                                              synthetic_qkv)
from isa_plugin.calibration.synthetic import WORKLOADS, pooled_attention

SPEC = SyntheticSpec(frames=4, height=16, width=16, heads=6, layers=3)


def test_shapes_determinism_and_layout():
    m = SyntheticModel(SPEC, seed=0)
    q, k, v, layout = m.sample(1, 5)
    assert q.shape == (1, 2048, 6, 64) and layout.spans == (("target", 1024), ("context", 1024))
    q2, _, _, _ = SyntheticModel(SPEC, seed=0).sample(1, 5)
    assert torch.equal(q, q2)
    q3, _, _, _ = m.sample(1, 6)
    assert not torch.equal(q, q3)
    spec = SyntheticSpec(frames=2, height=8, width=8, heads=2, layers=1, context_first=True, text_tokens=7)
    q, k, v, layout = SyntheticModel(spec).sample(0, 0, dtype=torch.bfloat16)
    assert layout.spans == (("context", 128), ("target", 128), ("text", 7)) and q.dtype == torch.bfloat16
    q, k, v, layout = synthetic_qkv(3, 6, 10, 4, 64, dtype=torch.float32)
    assert q.shape == (1, 360, 4, 64) and layout.num_tokens == 360


def test_attention_is_structured():
    """Local/semantic heads are peaked, uniform heads flat; deeper layers give context less mass."""
    m = SyntheticModel(SPEC, seed=0)
    masses = []
    for layer in (0, SPEC.layers - 1):
        q, k, v, layout = m.sample(layer, 1)
        n = layout.num("target")
        p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]), -1)[0]
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1) / math.log(p.shape[-1])  # [H] in [0, 1]
        kinds = m.head_kinds[layer]
        for h, kind in enumerate(kinds):
            if kind == "uniform":
                assert ent[h] > 0.9
            elif kind in ("local", "semantic"):
                assert ent[h] < 0.8
        masses.append(float(p[:, :n, n:].sum(-1).mean()))
    assert masses[1] < masses[0]


def test_heldout_profile_meets_budget_and_beats_defaults(capsys):
    """Calibrate on two samples, check on two held-out ones with the full reference ISA."""
    model = SyntheticModel(SPEC, seed=0)
    stats = calibrate_synthetic(model, [0, 1], blocks_per_kind=12, tokens_per_block=16)
    default = evaluate_synthetic(model, ISAConfig(), [2, 3])
    lines = ["layer            default err_t/err_c/cost      fitted err_t/err_c/cost (held-out)   budget"]
    # 1) at equal error: budget = the defaults' worst error per query kind
    budget = (max(r["error_target"] for r in default.values()), max(r["error_context"] for r in default.values()))
    for b in (budget, 0.05):
        prof = fit_profile(stats, b)
        held = evaluate_synthetic(model, prof, [2, 3])
        bt, bc = (b, b) if isinstance(b, float) else b
        for name, r in held.items():
            d = default[name]
            lines.append(f"{name:<16} {d['error_target']:.3f}/{d['error_context']:.3f}/{d['relative_cost']:.3f}   "
                         f"{r['error_target']:.3f}/{r['error_context']:.3f}/{r['relative_cost']:.3f}   {bt:.3f}/{bc:.3f}")
            assert r["error_target"] <= bt and r["error_context"] <= bc, (name, r, b)
        if b is budget:
            mean_fit = sum(r["relative_cost"] for r in held.values()) / len(held)
            mean_def = sum(r["relative_cost"] for r in default.values()) / len(default)
            lines.append(f"mean cost at the defaults' error: fitted {mean_fit:.3f} vs defaults {mean_def:.3f}")
            assert mean_fit < mean_def
            assert all(r["relative_cost"] < default[n]["relative_cost"] for n, r in held.items())
    # 2) per layer, at exactly that layer's default errors (the fit aims at margin x budget, so it may pay a
    #    little more than the defaults where they happen to sit just at the budget): cheaper on average
    costs = []
    for name, d in default.items():
        prof = fit_profile(stats, (d["error_target"], d["error_context"]))
        r = evaluate_synthetic(model, prof, [2, 3], layers=[name])[name]
        lines.append(f"{name} at its default error {d['error_target']:.3f}/{d['error_context']:.3f}: held-out "
                     f"{r['error_target']:.3f}/{r['error_context']:.3f}, cost {r['relative_cost']:.3f} vs {d['relative_cost']:.3f}")
        assert r["error_target"] <= d["error_target"] and r["error_context"] <= d["error_context"], (name, r, d)
        costs.append((r["relative_cost"], d["relative_cost"]))
    assert sum(c for c, _ in costs) < sum(c for _, c in costs), "\n".join(lines)


# ---------------------------------------------------------------------------------------- the diffuse workload
# (WORKLOADS["diffuse"]: flat heads, broad context queries, motion between target and source)
DIFFUSE = SyntheticSpec.preset("diffuse", frames=SPEC.frames, height=SPEC.height, width=SPEC.width, heads=SPEC.heads,
                               layers=SPEC.layers)


@pytest.fixture(scope="module")
def pooled_rows():
    """Pooled attention [H, nb, nb] of both workloads (model seed 0) for every layer on samples 0 and 1."""
    out = {}
    for name, spec in (("structured", SPEC), ("diffuse", DIFFUSE)):
        model = SyntheticModel(spec, seed=0)
        for layer in range(spec.layers):
            for sample in (0, 1):
                q, k, _, layout = model.sample(layer, sample)
                out[name, layer, sample] = pooled_attention(q, k, layout)[0]
    return out


def _entropy_top10(p):
    """Normalised entropy and top-10% block mass of each pooled row: two [H, nb] tensors."""
    nb = p.shape[-1]
    return -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(nb), p.topk(nb // 10, -1).values.sum(-1)


def test_workload_presets_and_validation():
    assert WORKLOADS["structured"] == SyntheticSpec() and SyntheticSpec.preset("structured", frames=8) == SyntheticSpec(frames=8)
    d = SyntheticSpec.preset("diffuse", frames=8)
    assert d.frames == 8 and d.motion > 0 and d.temperature < 1 and d.content_match == "cosine"
    with pytest.raises(ValueError, match="unknown synthetic workload 'sharp'"):
        SyntheticSpec.preset("sharp")
    for bad, match in ((dict(temperature=0.0), "temperature=0.0 must be > 0"), (dict(motion=-1.0), "motion=-1.0 must be >= 0"),
                       (dict(content_match="dot"), "content_match='dot' is not supported")):
        with pytest.raises(ValueError, match=match):
            SyntheticSpec(**bad)
    # the structured model has no motion: its source positions are the grid
    m = SyntheticModel(SPEC)
    src = m.source_positions(3)
    assert src.shape == (1024, 3) and torch.equal(src[:, 1], torch.arange(16.0).repeat_interleave(16).repeat(4))


def test_diffuse_rows_are_flatter_than_structured(pooled_rows):
    """At the same shape the diffuse workload's pooled rows have a higher entropy and a lower top-10% mass.

    Measured (model seed 0, samples 0-1, layers 0-2, mean over heads and target query blocks): entropy
    0.79-0.96 (mean 0.88) against 0.64-0.83 (0.72) structured, top-10% block mass 0.19-0.38 (0.28) against
    0.35-0.62 (0.51); model seeds 1 and 2 give the same picture. The rows are flat, not uniform: a uniform
    row has entropy 1 and top-10% mass 0.10.
    """
    ent, top = {}, {}
    for (name, layer, sample), p in pooled_rows.items():
        e, t = _entropy_top10(p)
        nt = p.shape[-1] // 2
        ent[name, layer, sample], top[name, layer, sample] = float(e[:, :nt].mean()), float(t[:, :nt].mean())
    keys = [k[1:] for k in ent if k[0] == "diffuse"]
    for k in keys:
        assert ent[("diffuse",) + k] > ent[("structured",) + k] and top[("diffuse",) + k] < top[("structured",) + k], k
        assert ent[("diffuse",) + k] < 0.98 and top[("diffuse",) + k] > 0.15, k  # broad, not near-uniform noise
    mean = lambda d, name: sum(v for key, v in d.items() if key[0] == name) / len(keys)  # noqa: E731
    assert mean(ent, "diffuse") > mean(ent, "structured") + 0.1  # measured 0.88 vs 0.72
    assert mean(top, "diffuse") < mean(top, "structured") - 0.15  # measured 0.28 vs 0.50


def test_diffuse_context_queries_spread(pooled_rows):
    """Context query blocks of the diffuse workload spread their mass over many key blocks.

    Bound: the mean top-10% block mass of context query rows stays <= 0.35 and its 90th percentile over
    (head, block) <= 0.5 in every layer and sample. Measured at this shape for model seeds 0-2 on samples
    0-1: means 0.15-0.32, 90th percentiles 0.21-0.48 (seed 0: 0.16-0.29 and 0.21-0.41), against means
    0.21-0.59 and 90th percentiles 0.43-0.80 for the structured workload, and 0.10 for uniform rows. Under
    the bound the top 10% of key blocks hold at most about a third of a context query block's mass.
    """
    for layer in range(DIFFUSE.layers):
        for sample in (0, 1):
            p = pooled_rows["diffuse", layer, sample]
            _, top = _entropy_top10(p)
            ctx = top[:, p.shape[-1] // 2:]
            assert float(ctx.mean()) <= 0.35 and float(ctx.flatten().quantile(0.9)) <= 0.5, (layer, sample, ctx.mean())


def _moved(p, frames):
    """Per target frame: the fraction of target query blocks whose argmax context block is not the same-position one."""
    pm = p.mean(0)  # over heads
    nt = pm.shape[-1] // 2
    argmax = pm[:nt, nt:].argmax(-1)
    return (argmax != torch.arange(nt)).reshape(frames, -1).float().mean(-1)  # [frames]


def test_diffuse_motion_moves_the_correspondence(pooled_rows):
    """With motion, the context block target query blocks attend to most is not the same-position one.

    Frame 0 is not moved (θ_0 = 0, d_0 = 0). Over frames > 0 of layers 0-2 and samples 0-1 (head-mean pooled
    rows), measured at model seed 0: 75% of target query blocks have another argmax context block, and all
    18 (layer, sample, frame) cases have it for at least half their blocks (seeds 1, 2: 83% and 75%, 17 and
    16 of 18); the structured workload (identity correspondence): 8%, 2 of 18 (seeds 1, 2: 6%, 0 of 18).
    """
    frac, frames_moved = {}, {}
    for name in ("structured", "diffuse"):
        moved = torch.stack([_moved(pooled_rows[name, layer, sample], SPEC.frames)[1:]
                             for layer in range(SPEC.layers) for sample in (0, 1)])  # [cases, frames - 1]
        frac[name], frames_moved[name] = float(moved.mean()), float((moved >= 0.5).float().mean())
    assert frac["diffuse"] >= 0.6 and frames_moved["diffuse"] >= 0.6, (frac, frames_moved)
    assert frac["structured"] <= 0.2 and frames_moved["structured"] <= 0.2, (frac, frames_moved)
    # the motion field: frame 0 in place, later frames displaced by whole tokens or more
    src = SyntheticModel(DIFFUSE).source_positions(0).reshape(SPEC.frames, -1, 3)
    grid = SyntheticModel(SPEC).source_positions(0).reshape(SPEC.frames, -1, 3)
    shift = (src - grid)[..., 1:].norm(dim=-1).mean(-1)  # [frames] mean displacement in tokens
    assert float(shift[0]) == 0.0 and bool((shift[1:] > 1.0).all()), shift


def test_diffuse_determinism_from_seeds():
    m = SyntheticModel(DIFFUSE, seed=0)
    a = m.sample(1, 5)
    b = SyntheticModel(DIFFUSE, seed=0).sample(1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert torch.equal(m.source_positions(5), SyntheticModel(DIFFUSE, seed=3).source_positions(5))  # a sample's motion
    assert not torch.equal(m.source_positions(5), m.source_positions(6))
    assert not torch.equal(a[0], m.sample(1, 6)[0]) and not torch.equal(a[0], SyntheticModel(DIFFUSE, seed=1).sample(1, 5)[0])
    q, k, v, layout = synthetic_qkv(2, 8, 8, 2, 64, dtype=torch.float32, workload="diffuse", sample_seed=4)
    q2, _, _, _ = synthetic_qkv(2, 8, 8, 2, 64, dtype=torch.float32, workload="diffuse", sample_seed=4)
    q3, _, _, _ = synthetic_qkv(2, 8, 8, 2, 64, dtype=torch.float32, sample_seed=4)
    assert q.shape == (1, 256, 2, 64) and torch.equal(q, q2) and not torch.equal(q, q3)


def test_diffuse_workload_through_calibration_helpers():
    """calibrate_synthetic, fit_profile and evaluate_synthetic take a diffuse model like any other."""
    spec = SyntheticSpec.preset("diffuse", frames=2, height=8, width=16, heads=2, layers=1)
    model = SyntheticModel(spec, seed=0)
    stats = calibrate_synthetic(model, [0, 1], blocks_per_kind=4, tokens_per_block=8)
    prof = fit_profile(stats, 0.05)
    held = evaluate_synthetic(model, prof, [2])
    assert set(held) == {"blocks.0.attn1"} and all(0 < r["relative_cost"] <= 1 for r in held.values())
