"""Profiles that hold on inputs they were not fitted on (the leave-one-sample-out fit), on the synthetic workload.

Statistics are taken with every block and token sampled, so the fit's error estimates are exact ISA errors:
the profile's recorded predicted and held-out errors can then be re-measured with the full reference ISA.
"""

import pytest

from isa_plugin.calibration.fit import fit_profile
from isa_plugin.calibration.synthetic import SyntheticModel, SyntheticSpec, calibrate_synthetic, evaluate_synthetic

SPEC = SyntheticSpec(frames=2, height=16, width=16, heads=4, layers=3)  # 512 target + 512 context tokens
FIT, FRESH = [0, 1, 2], [10, 11, 12]  # FRESH samples are never seen by the fit
BUDGET = 0.05
EXACT = dict(blocks_per_kind=10_000, tokens_per_block=64)  # every block and token: no sampling error
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(one_thread):
    model = SyntheticModel(SPEC, seed=1)
    stats = calibrate_synthetic(model, FIT, **EXACT)
    # exact statistics need no sampling margin: the leave-one-sample-out check alone keeps the fit general
    return model, fit_profile(stats, BUDGET, margin=1.0)


def test_profile_fitted_leave_one_sample_out_meets_the_budget_on_fresh_samples(fitted):
    model, prof = fitted
    sparse = [n for n in model.layer_names if not prof.layers[n][0].dense]
    assert sparse, "every layer kept dense: the check below would hold trivially"
    fresh = evaluate_synthetic(model, prof, FRESH)
    for name, r in fresh.items():
        assert r["error_target"] <= BUDGET and r["error_context"] <= BUDGET, (name, r)
    assert all(fresh[n]["relative_cost"] < 1.0 for n in sparse)


def test_recorded_predicted_and_held_out_errors_are_what_the_reference_measures(fitted):
    model, prof = fitted
    checks = prof.calibrated_on["held_out"]
    assert any(checks[n][0]["margin"] < 1.0 for n in model.layer_names), "no layer needed a tighter fit: the check was idle"
    on_fit = evaluate_synthetic(model, prof, FIT)
    folds = {}  # left-out sample -> (statistics of the other samples, by margin: a profile fitted on them)
    for name in model.layer_names:
        (check,), (setting,) = checks[name], prof.layers[name]
        assert check["samples"] == len(FIT)
        if setting.dense:
            assert check["held_out_target"] == check["held_out_context"] == 0.0
            continue
        # predicted: the in-sample error of the final setting, measured by the reference on the fit samples
        assert check["predicted_target"] == pytest.approx(on_fit[name]["error_target"], rel=1e-3, abs=1e-6)
        assert check["predicted_context"] == pytest.approx(on_fit[name]["error_context"], rel=1e-3, abs=1e-6)
        # held out: per left-out sample, fit on the others at the recorded margin (no check of its own) and
        # measure on the left-out sample; the profile records the worst
        worst = [0.0, 0.0]
        for s in FIT:
            others = [i for i in FIT if i != s]
            if s not in folds:
                folds[s] = (calibrate_synthetic(model, others, **EXACT), {})
            stats, by_margin = folds[s]
            if check["margin"] not in by_margin:
                by_margin[check["margin"]] = fit_profile(stats, BUDGET, margin=check["margin"], held_out=False)
            r = evaluate_synthetic(model, by_margin[check["margin"]], [s], layers=[name])[name]
            worst = [max(worst[0], r["error_target"]), max(worst[1], r["error_context"])]
        assert check["held_out_target"] == pytest.approx(worst[0], rel=1e-3, abs=2e-5), name
        assert check["held_out_context"] == pytest.approx(worst[1], rel=1e-3, abs=2e-5), name
        assert check["held_out_target"] <= BUDGET and check["held_out_context"] <= BUDGET


def test_margin_bisection_keeps_the_largest_margin_that_passes(monkeypatch):
    from isa_plugin.calibration import heldout
    from isa_plugin.layer_setting import LayerSetting

    edge = 0.7  # margins above it fail the leave-one-sample-out check
    monkeypatch.setattr(heldout, "held_out_check", lambda samples, fit_one, budget, grid: (
        (0.06, 0.0) if fit_one(None).relative_cost > edge else (0.04, 0.0)))
    fit_at = lambda st, m: LayerSetting(mode="adaptive", mass=0.9, relative_cost=m)  # noqa: E731
    budget = {"target": BUDGET, "context": BUDGET}
    shrink_only = 0.85 * 0.95 * BUDGET / 0.06  # the first margin the shrinking step tries after 0.85 fails
    setting, rec = heldout.fit_generalising(None, {0: None, 1: None}, None, budget, fit_at, 0.85)
    step = (0.85 - shrink_only) / 2 ** heldout.MARGIN_BISECTIONS
    assert edge - step <= rec["margin"] <= edge and setting.relative_cost == pytest.approx(rec["margin"], abs=1e-4)
    monkeypatch.setattr(heldout, "MARGIN_BISECTIONS", 0)
    _, rec = heldout.fit_generalising(None, {0: None, 1: None}, None, budget, fit_at, 0.85)
    assert rec["margin"] == pytest.approx(shrink_only, abs=1e-4)
