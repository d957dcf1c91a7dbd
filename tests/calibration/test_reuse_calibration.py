"""Calibration of plan reuse (``isa_plugin.calibration.plan_reuse``) on a tiny Wan ICL pipeline (CPU)."""

import pytest
import torch

pytest.importorskip("diffusers")

from isa_plugin import ISAConfig, ThresholdProfile  # noqa: E402
from isa_plugin.calibration.plan_reuse import ReuseErrors, choose_plan_reuse, measure_plan_reuse  # noqa: E402

LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]


@pytest.fixture(scope="module")
def pipe():
    from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline

    return build_tiny_wan_icl_pipeline(TinyPreset(heads=2, head_dim=32, layers=2, height=64, width=64, frames=9, block_size=8, steps=4))


def _video():
    g = torch.Generator().manual_seed(0)
    return torch.rand(9, 3, 64, 64, generator=g)


def _run(pipe, cfg, max_reuse=3):
    profile = ThresholdProfile.uniform(LAYERS, cfg)
    return profile, measure_plan_reuse(pipe, profile, [_video()], "make it winter", max_reuse=max_reuse, steps=4,
                                       height=64, width=64, frames=9)


def test_stale_plans_measured_on_every_step(pipe):
    cfg = ISAConfig(block_size=8, alpha_s=0.25, alpha_f=0.25, alpha_ns=0.25)
    profile, errors = _run(pipe, cfg)
    assert set(errors.errors) == set(LAYERS)
    assert all(errors.calls[n] == 4 * 2 for n in LAYERS)  # 4 steps x (cond, uncond)
    for per_age in errors.errors.values():
        assert set(per_age) == {0, 1, 2}
        assert all(t > 0 and c > 0 for t, c in per_age.values())
    # a stale plan is a different plan: its error differs from the fresh one's on some layer
    assert any(per_age[1] != per_age[0] for per_age in errors.errors.values())
    assert "age 2" in errors.table()


def test_exact_settings_reuse_as_far_as_measured(pipe):
    """All ratios 1: every plan is dense attention, stale or not, so every layer may reuse for max_reuse steps."""
    cfg = ISAConfig(block_size=8, alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0)
    profile, errors = _run(pipe, cfg)
    assert all(max(max(e) for e in per_age.values()) < 1e-5 for per_age in errors.errors.values())
    chosen = choose_plan_reuse(profile, errors, 0.05)
    assert all(chosen.setting(n).to_config().plan_reuse == 3 for n in LAYERS)
    assert all(profile.setting(n).to_config().plan_reuse == 1 for n in LAYERS)  # the input profile is unchanged


def test_choice_rule():
    profile = ThresholdProfile.uniform(["a", "b", "c"], ISAConfig())
    errors = ReuseErrors(4, errors={
        "a": {0: (0.01, 0.01), 1: (0.02, 0.02), 2: (0.06, 0.01), 3: (0.01, 0.01)},  # age 2 breaks: k = 2
        "b": {0: (0.01, 0.01), 1: (0.01, 0.051)},  # context breaks at age 1: k = 1
        "c": {0: (0.01, 0.01), 1: (0.01, 0.01), 2: (0.01, 0.01), 3: (0.04, 0.04)},  # within: k = 4
    })
    chosen = choose_plan_reuse(profile, errors, 0.05, margin=1.0)
    assert [chosen.setting(n).to_config().plan_reuse for n in "abc"] == [2, 1, 4]
    assert choose_plan_reuse(profile, errors, 0.05, margin=0.5).setting("c").to_config().plan_reuse == 3  # age 3 > 0.025


def test_bad_max_reuse(pipe):
    with pytest.raises(ValueError, match="max_reuse"):
        _run(pipe, ISAConfig(block_size=8), max_reuse=1)
