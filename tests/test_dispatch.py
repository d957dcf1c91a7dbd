"""Executor dispatch by the device's cost model (``isa_plugin.dispatch``, ``CostModel.executor_time``)."""

import json

import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin import dispatch
from isa_plugin.calibration.cost import CostModel, load_cost_model
from isa_plugin.execution import Executor, register_executor
from isa_plugin.selection import get_mode
from isa_plugin.selection.base import plan_from_pooled

FULL = Layout([("target", 1024), ("context", 1024)])
RAGGED = Layout([("text", 77), ("target", 1000), ("context", 700), ("context", 301)])


@pytest.mark.parametrize("layout", [FULL, RAGGED])
@pytest.mark.parametrize("ratios", [dict(alpha_s=0.125, alpha_f=0.5, alpha_ns=0.0625),
                                    dict(alpha_s=(0.25, 1.0, 0.5), alpha_f=(0.25, 0.75, 1.0), alpha_ns=0.125)])
def test_fixed_call_pairs_count_the_plan(layout, ratios):
    """The fixed mode's pairs before planning equal its plan's (exactly on full blocks, within 2% on ragged spans,
    whose short blocks the count rule averages)."""
    cfg = ISAConfig(block_size=64, **ratios)
    H = 3
    blocks = layout.blocks(64)
    g = torch.Generator().manual_seed(0)
    qbar, kbar = (torch.randn(1, H, blocks.num_blocks, 32, generator=g) for _ in range(2))
    plan = plan_from_pooled(cfg.selection, qbar, kbar, blocks, cfg.settings, 32 ** -0.5)
    e, a = plan.pair_counts()
    pe, pa = cfg.selection.call_pairs(cfg.settings, layout, 64, H)
    tol = 1e-9 if layout is FULL else 0.02
    assert pe == pytest.approx(e, rel=tol) and pa == pytest.approx(a, rel=tol)


def test_adaptive_pairs_are_unknown_before_planning():
    cfg = ISAConfig("adaptive", block_size=64, mass=0.9)
    assert cfg.selection.call_pairs(cfg.settings, FULL, 64, 4) is None


def _card(tmp_path, executors):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"cards": {"Card X": {"ms_per_gexact_pair": 1.0, "ms_per_gapprox_pair": 5.0, "ms_per_call": 1.0,
                                                     "executors": executors}}}))
    return path


def test_cost_model_reads_executor_coefficients(tmp_path):
    path = _card(tmp_path, {"triton": {"ms_per_gexact_pair": 0.85, "ms_per_gpseudo_pair": 7.7, "ms_per_call": 1.6},
                            "sparse": {"ms_per_gexact_pair": 1.74, "ms_per_gpseudo_pair": 23.7}})
    cm = load_cost_model(path, device_name="Card X")
    assert cm.executor_time("triton", 2e9, 1e9) == pytest.approx(0.85 * 2 + 7.7 + 1.6)
    assert cm.executor_time("sparse", 2e9, 1e9, head_dim=64) == pytest.approx((1.74 * 2 + 23.7) / 2)
    assert cm.executor_time("flex", 1e9, 0.0) is None
    assert "executors" in cm.to_dict() and "executors" not in CostModel().to_dict()


@pytest.mark.parametrize("bad,match", [({"sparse": {"ms_per_gexact_pair": -1}}, "must be a finite non-negative"),
                                       ({"sparse": {"ms_per_gexact_pair": 0}}, "must be positive"),
                                       ([1, 2], "must map executor names")])
def test_cost_model_rejects_bad_executor_entries(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        load_cost_model(_card(tmp_path, bad), device_name="Card X")


def test_predicted_times_rank_the_executors_by_the_call_pairs():
    cm = CostModel(a=1.0, executors=(("fast_exact", 1e-9, 100e-9, 0.0), ("fast_pseudo", 2e-9, 1e-9, 0.0)))
    q = torch.zeros(1, FULL.num_tokens, 4, 128)
    few_exact = ISAConfig(block_size=64, alpha_s=1.0, alpha_f=0.0625, alpha_ns=0.0625)
    all_exact = ISAConfig(block_size=64, alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0)
    t = dispatch.predicted_times(["fast_exact", "fast_pseudo"], q, FULL, few_exact, model=cm)
    assert t["fast_pseudo"] < t["fast_exact"]  # many pseudo-key pairs
    t = dispatch.predicted_times(["fast_exact", "fast_pseudo"], q, FULL, all_exact, model=cm)
    assert t["fast_exact"] < t["fast_pseudo"]  # none
    assert dispatch.predicted_times(["fast_exact", "flex"], q, FULL, all_exact, model=cm) is None
    assert dispatch.predicted_times(["fast_exact"], q, FULL, ISAConfig("adaptive", block_size=64), model=cm) is None


class _Fake(Executor):
    def __init__(self, name, why_not=None):
        self.name, self.why_not = name, why_not

    def ineligible(self, q, config):
        return self.why_not


@pytest.fixture
def fakes():
    from isa_plugin.execution import _EXECUTORS

    made = [register_executor(_Fake("fake_a")), register_executor(_Fake("fake_b")),
            register_executor(_Fake("fake_no", "fake_no cannot serve this call"))]
    dispatch._CHOICES.clear()
    yield
    for e in made:
        _EXECUTORS.remove(e.name)
    dispatch._CHOICES.clear()


def test_choose_takes_the_fastest_eligible_executor(fakes, monkeypatch):
    q = torch.zeros(1, FULL.num_tokens, 4, 64)
    cfg = ISAConfig(block_size=64)
    # on the CPU the cost model is not consulted: the mode's order decides
    assert dispatch.choose_executor(q, FULL, cfg, ["fake_no", "fake_a", "fake_b"]) == ("fake_a", None)
    assert dispatch.choose_executor(q, FULL, cfg, ["fake_no"]) == (None, "fake_no cannot serve this call")
    # with predicted times (as on a GPU with a measured card), the fastest eligible one
    monkeypatch.setattr(dispatch, "predicted_times", lambda names, *a, **k: {n: {"fake_a": 2.0, "fake_b": 1.0}[n] for n in names})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    dispatch._CHOICES.clear()
    assert dispatch._choose(q, FULL, cfg, ("fake_a", "fake_b", "fake_no")) == ("fake_b", None)
    # no times (a mode that cannot count its pairs, a card without coefficients): the mode's order
    monkeypatch.setattr(dispatch, "predicted_times", lambda *a, **k: None)
    assert dispatch._choose(q, FULL, cfg, ("fake_a", "fake_b")) == ("fake_a", None)


def test_fixed_mode_lists_both_triton_executors():
    assert get_mode("fixed").executors[:2] == ("triton", "sparse")


def test_a_card_with_executor_coefficients_only_takes_the_kernels_from_its_triton_entry(tmp_path):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"cards": {"Card Y": {"executors": {
        "triton": {"ms_per_gexact_pair": 0.93, "ms_per_gpseudo_pair": 12.2, "ms_per_call": 0.5},
        "sparse": {"ms_per_gexact_pair": 1.63, "ms_per_gpseudo_pair": 3.5}}}}}))
    cm = load_cost_model(path, device_name="Card Y")
    assert cm.a == pytest.approx(0.93e-9) and cm.b == pytest.approx(12.2e-9) and cm.c == pytest.approx(0.5)
    assert cm.executor_time("triton", 1e9, 0.0) == pytest.approx(0.93 + 0.5)
    assert cm.executor_time("sparse", 1e9, 1e9) == pytest.approx(1.63 + 3.5)
    # a card measured by the kernel benchmark alone: "triton" is the card's own model, other executors unknown
    path.write_text(json.dumps({"cards": {"Card Z": {"ms_per_gexact_pair": 0.85, "ms_per_gapprox_pair": 7.7, "ms_per_call": 1.6}}}))
    cm = load_cost_model(path, device_name="Card Z")
    assert cm.executor_time("triton", 1e9, 0.0) == pytest.approx(0.85 + 1.6) and cm.executor_time("sparse", 1e9, 0.0) is None
