"""fit_profile on hand-made statistics, and the cost model reader."""

import json
import math
import re

import pytest
import torch

from isa_plugin.calibration.cost import DEFAULT_COST_MODEL, CostModel, load_cost_model
from isa_plugin.calibration.fit import fit_profile, parse_budget
from isa_plugin.calibration.statistics import CalibrationStats, Grid, LayerErrorStats
from isa_plugin.selection import get_mode
from isa_plugin.selection.fixed import setting_pairs

GRID = Grid(alpha_s=(0.125, 0.5, 1.0), alpha_f=(0.25, 0.5, 1.0), alpha_ns=(0.0625, 0.25))
FIXED = GRID.modes["fixed"]
TOKENS = {"target": 4096, "context": 4096, "text": 0}
BLOCKS = {"target": 64, "context": 64, "text": 0}


def layer_costs(ls, grid, cost_model):
    """Per-head time of every fixed grid setting [S, F, NS], the per-head time of a dense head, and the dense
    layer time (from the fixed mode's candidate table)."""
    fixed = grid.modes["fixed"]
    table = get_mode("fixed").candidates(ls.modes["fixed"], fixed, ls, cost_model)
    S, F, NS = fixed.shape[1:]
    costs = table.cost[: S * F * NS].view(S, F, NS)
    return costs, table.dense_head, cost_model.dense_time(sum(ls.mean_tokens().values()), ls.heads, ls.head_dim)


def _stats(err_fn, heads=4, layers=("blocks.0.attn1",)):
    """Statistics whose error per (head, kind, metric, s, f, ns) is err_fn(h, kind, m, a_s, a_f, a_ns)."""
    st = CalibrationStats(GRID)
    for name in layers:
        ls = LayerErrorStats.zeros(heads, 64, GRID)
        fx = ls.modes["fixed"]
        for h in range(heads):
            for kind in range(2):
                fx["den"][h, kind] = 100.0
                for mi in range(len(FIXED.metrics)):
                    for si, a_s in enumerate(FIXED.alpha_s):
                        for fi, a_f in enumerate(FIXED.alpha_f):
                            for ni, a_ns in enumerate(FIXED.alpha_ns):
                                fx["num"][h, kind, mi, si, fi, ni] = 100.0 * err_fn(h, kind, mi, a_s, a_f, a_ns)
        ls.calls = 1
        ls.tokens, ls.blocks = dict(TOKENS), dict(BLOCKS)
        st.layers[(name, 0)] = ls
    return st


def _smooth(h, kind, m, a_s, a_f, a_ns, scale=1.0):
    # error falls as any ratio grows; context queries suffer more from pruning
    prune = (1 - a_s) * (0.3 if kind else 0.05)
    taylor = (1 - a_f) * (1 - a_ns) * 0.1
    return scale * (prune + taylor)


def _cost(prof, name="blocks.0.attn1"):
    return prof.setting(name).relative_cost


def test_respects_budget_and_is_cheapest_feasible():
    st = _stats(_smooth)
    for budget in (0.02, 0.05, 0.1, 0.3):
        prof = fit_profile(st, budget, per_head=False, margin=1.0)
        s = prof.setting("blocks.0.attn1")
        assert s.error_target <= budget + 1e-12 and s.error_context <= budget + 1e-12
        # brute force: no feasible grid setting is cheaper
        costs, _, dense = layer_costs(st.get("blocks.0.attn1"), GRID, DEFAULT_COST_MODEL)
        best = math.inf
        for si, a_s in enumerate(FIXED.alpha_s):
            for fi, a_f in enumerate(FIXED.alpha_f):
                for ni, a_ns in enumerate(FIXED.alpha_ns):
                    if max(_smooth(0, 0, 0, a_s, a_f, a_ns), _smooth(0, 1, 0, a_s, a_f, a_ns)) <= budget + 1e-12:
                        best = min(best, float(costs[si, fi, ni]) * 4 / dense)
        assert s.relative_cost == pytest.approx(best)
    # a looser budget never costs more
    costs = [_cost(fit_profile(st, b, per_head=False, margin=1.0)) for b in (0.02, 0.05, 0.1, 0.3)]
    assert costs == sorted(costs, reverse=True)


def test_separate_budgets_and_margin():
    st = _stats(_smooth)
    prof = fit_profile(st, {"target": 0.3, "context": 0.02}, per_head=False, margin=1.0)
    s = prof.setting("blocks.0.attn1")
    assert s.error_context <= 0.02 and prof.budget == {"metric": "rel_l1", "target": 0.3, "context": 0.02}
    tight = fit_profile(st, 0.1, per_head=False, margin=0.5).setting("blocks.0.attn1")
    assert tight.error_target <= 0.05 and tight.error_context <= 0.05


def test_dense_when_nothing_fits():
    st = _stats(lambda *a: 0.5)
    prof = fit_profile(st, 0.05)
    s = prof.setting("blocks.0.attn1")
    assert s.dense and prof.config_for("blocks.0.attn1") is None


def test_tiny_budget_keeps_only_exact_settings():
    st = _stats(lambda h, kind, m, a_s, a_f, a_ns: 0.0 if (a_s == 1 and a_f == 1) else 0.01)
    s = fit_profile(st, 1e-6, per_head=False).setting("blocks.0.attn1")
    assert s.dense  # alpha_s = alpha_f = 1 is dense attention: not cheaper, so the layer stays dense


def test_per_head_where_heads_differ():
    # head 0 is fragile (needs everything), the others are robust
    def err(h, kind, m, a_s, a_f, a_ns):
        return _smooth(h, kind, m, a_s, a_f, a_ns, scale=(20.0 if h == 0 else 0.2))

    st = _stats(err)
    uni = fit_profile(st, 0.05, per_head=False, margin=1.0).setting("blocks.0.attn1")
    ph = fit_profile(st, 0.05, per_head="auto", margin=1.0).setting("blocks.0.attn1")
    assert ph.relative_cost < uni.relative_cost
    assert isinstance(ph.alpha_s, tuple) or isinstance(ph.alpha_f, tuple)
    assert ph.error_target <= 0.05 + 1e-12 and ph.error_context <= 0.05 + 1e-12
    assert len(ph.error_target_per_head) == 4
    # identical heads: per-head ratios do not pay, one setting for the layer
    same = fit_profile(_stats(_smooth), 0.05, per_head="auto", margin=1.0).setting("blocks.0.attn1")
    assert not any(isinstance(getattr(same, r), tuple) for r in ("alpha_s", "alpha_f", "alpha_ns"))


def test_sharpness_metric_choice():
    # l2 ranks better than topk_mass here: lower errors at the same ratios
    st = _stats(lambda h, kind, m, a_s, a_f, a_ns: _smooth(h, kind, m, a_s, a_f, a_ns, scale=(1.0 if m == 0 else 0.3)))
    assert fit_profile(st, 0.05, per_head=False).setting("blocks.0.attn1").sharpness == "l2"


def test_cost_model_changes_the_choice():
    st = _stats(_smooth)
    cheap_means = fit_profile(st, 0.1, CostModel(a=1.0, b=0.01), per_head=False, margin=1.0).setting("blocks.0.attn1")
    dear_means = fit_profile(st, 0.1, CostModel(a=1.0, b=1000.0), per_head=False, margin=1.0).setting("blocks.0.attn1")
    assert (cheap_means.alpha_ns, cheap_means.alpha_f) == (0.0625, 0.25)
    # block means as dear as 1000 exact pairs: compute more blocks exactly (or stay dense)
    assert dear_means.dense or dear_means.alpha_ns > 0.0625 or dear_means.alpha_f > 0.25


def test_profile_metadata_and_errors():
    st = _stats(_smooth, layers=("blocks.0.attn1", "blocks.1.attn1"))
    prof = fit_profile(st, 0.05, metadata={"transformer_class": "WanTransformer3DModel", "frames": 81})
    assert prof.calibrated_on["layer_names"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert prof.calibrated_on["frames"] == 81 and "torch" in prof.calibrated_on["versions"]
    for bad, message in [(-0.1, "budget=-0.1 is out of range; use a value in (0, 1), e.g. 0.05"), (0.0, "budget=0.0"),
                         (2, "budget=2.0 is out of range"), ("5%", "budget='5%' must be a number"),
                         ((0.05, 1.5), "context budget=1.5"), ((0.05,), "pair")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            fit_profile(st, bad)
    with pytest.raises(ValueError, match="no measured"):
        fit_profile(CalibrationStats(GRID), 0.05)
    assert parse_budget((0.05, 0.2)) == {"metric": "rel_l1", "target": 0.05, "context": 0.2}


def test_setting_pairs_matches_plan_relative_cost():
    from isa_plugin import ISAConfig, Layout
    from isa_plugin.executors.reference import plan_reference

    layout = Layout([("target", 1024), ("context", 1024)])
    q = k = torch.randn(1, 2048, 1, 32)
    for a in [(0.125, 0.5, 0.0625), (0.5, 0.25, 0.25), (1.0, 1.0, 1.0)]:
        plan = plan_reference(q, k, layout, ISAConfig(alpha_s=a[0], alpha_f=a[1], alpha_ns=a[2]))
        e, ap = setting_pairs(*a, {"target": 1024, "context": 1024}, {"target": 16, "context": 16})
        assert (e + ap) / 2048**2 == pytest.approx(plan.relative_cost(), rel=1e-9)


def test_load_cost_model(tmp_path):
    p = tmp_path / "cm.json"
    p.write_text(json.dumps({"a": 2.0, "b": 0.5, "c": 10.0}))
    cm = load_cost_model(p)
    assert (cm.a, cm.b, cm.c) == (2.0, 0.5, 10.0)
    p.write_text(json.dumps({"cards": {"NVIDIA H100 80GB HBM3": {"a": 1.0, "b": 0.2, "c": 3.0},
                                       "NVIDIA H200": {"a": 0.8, "b": 0.1, "c": 2.0}}, "default": "NVIDIA H200"}))
    assert load_cost_model(p, device_name="NVIDIA H100 80GB HBM3").c == 3.0
    assert load_cost_model(p, device_name="cpu").c == 2.0
    p.write_text(json.dumps({"cards": {"NVIDIA H100 80GB HBM3": {
        "ms_per_gexact_pair": 0.5, "ms_per_gapprox_pair": -0.01, "ms_per_call": 0.2, "dense_cudnn_ms_per_gpair": 0.3,
        "host_floor_ms": 3.0}}}))
    cm = load_cost_model(p, device_name="NVIDIA H100 80GB HBM3")
    assert cm.time(0, 0) == 3.0 and cm.time(1e10, 0) == pytest.approx(5.2)
    assert cm.a == pytest.approx(0.5e-9) and cm.b == 0.0 and cm.c == 0.2 and cm.dense_a == pytest.approx(0.3e-9)
    assert cm.dense_time(1000, 2, head_dim=64) == pytest.approx(0.3e-9 * 1e6 * 2 * 0.5)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_model(p)
    with pytest.raises(ValueError, match="does not exist"):
        load_cost_model(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        CostModel(a=-1.0)


def test_kernel_cost_model_file_if_present():
    """The file the kernel benchmark writes parses; on a machine without CUDA the pair count is used."""
    import torch

    from isa_plugin.calibration.cost import _DEFAULT_PATH

    if not _DEFAULT_PATH.is_file():
        pytest.skip("no isa_plugin/kernels/cost_model.json")
    cm = load_cost_model(_DEFAULT_PATH)
    assert cm.a > 0 and cm.head_dim_ref == 128
    if not torch.cuda.is_available():
        assert load_cost_model() == DEFAULT_COST_MODEL
    # the default ratios at the Wan 14B ICL shape: ISA is predicted clearly faster than cuDNN
    e, a = setting_pairs(0.125, 0.5, 0.0625, {"target": 32760, "context": 32760}, {"target": 512, "context": 512})
    assert cm.time(40 * e, 40 * a) / cm.dense_time(65520, 40) < 0.6


def test_timestep_buckets():
    st = _stats(_smooth)
    st.timestep_edges = (500.0,)
    hard = _stats(lambda *a: _smooth(*a, scale=10.0))
    st.layers[("blocks.0.attn1", 1)] = hard.get("blocks.0.attn1")  # high-noise bucket: everything fails
    prof = fit_profile(st, 0.05, per_head=False)
    assert prof.timestep_edges == (500.0,) and prof.num_buckets == 2
    assert not prof.setting("blocks.0.attn1", 100).dense and prof.setting("blocks.0.attn1", 900).dense
    assert prof.config_for("blocks.0.attn1", 900) is None


def test_bucket_budgets_fit_each_bucket_at_its_own_budget():
    st = _stats(_smooth)
    st.timestep_edges = (500.0,)
    st.layers[("blocks.0.attn1", 1)] = st.get("blocks.0.attn1")
    tight, loose = fit_profile(st, 0.03, per_head=False), fit_profile(st, 0.12, per_head=False)
    assert loose.setting("blocks.0.attn1", 900).relative_cost < tight.setting("blocks.0.attn1", 900).relative_cost
    prof = fit_profile(st, 0.05, per_head=False, bucket_budgets=(0.03, 0.12))
    assert prof.setting("blocks.0.attn1", 100) == tight.setting("blocks.0.attn1", 100)  # low noise: 0.03
    assert prof.setting("blocks.0.attn1", 900) == loose.setting("blocks.0.attn1", 900)  # high noise: 0.12
    assert prof.calibrated_on["bucket_budgets"] == [{"target": 0.03, "context": 0.03}, {"target": 0.12, "context": 0.12}]
    assert "bucket_budgets" not in tight.calibrated_on
    with pytest.raises(ValueError, match="one budget per timestep bucket"):
        fit_profile(st, 0.05, bucket_budgets=(0.03,))
    with pytest.raises(ValueError, match="budget"):
        fit_profile(st, 0.05, bucket_budgets=(0.03, 2.0))
