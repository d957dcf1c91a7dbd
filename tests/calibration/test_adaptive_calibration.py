"""Calibration of the adaptive mode: its statistics against the reference, and fit_profile over both modes."""

import pytest
import torch

from isa_plugin.calibration.cost import CostModel
from isa_plugin.calibration.fit import fit_profile
from isa_plugin.calibration.statistics import CalibrationStats, Grid
from isa_plugin.calibration.synthetic import SyntheticModel, SyntheticSpec, calibrate_synthetic
from isa_plugin.config import ISAConfig
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference
from isa_plugin.layer_setting import LayerSetting
from isa_plugin.profile import ThresholdProfile
from isa_plugin.selection import get_mode
from isa_plugin.selection.adaptive import AdaptiveGrid
from isa_plugin.selection.measure import Sampler

SPEC = SyntheticSpec(frames=2, height=8, width=8, heads=3, head_dim=32, layers=2)


def test_statistics_with_every_token_equal_the_reference_error():
    model = SyntheticModel(SPEC, seed=3)
    q, k, v, layout = model.sample(1, 5, dtype=torch.float64)
    a_s, mass = (0.5, 1.0), (0.6, 0.9)
    grid = AdaptiveGrid(alpha_s=a_s, mass=mass, pseudo_block=(4, 16), pseudo_keys=("mean", "kmeans"))
    r = get_mode("adaptive").measure(q, k, v, layout, grid, block_size=16,
                                     sampler=Sampler(blocks_per_kind=10_000, tokens_per_block=16))
    dense = dense_attention_reference(q, k, v)
    blocks = layout.blocks(16)
    kinds = blocks.kinds[blocks.token_block]
    for si, a in enumerate(a_s):
        for pi, p in enumerate(mass):
            for qi, (s, kind) in enumerate(grid.pseudo_variants):
                cfg = ISAConfig(mode="adaptive", alpha_s=a, mass=p, pseudo_block=s, pseudo_keys=kind, block_size=16)
                out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
                for h in range(SPEC.heads):
                    for kid in range(2):
                        sel = kinds == kid
                        want = float((out - dense)[0, sel, h].abs().sum() / dense[0, sel, h].abs().sum())
                        got = float(r["ad_num"][h, kid, si, pi, qi] / r["ad_den"][h, kid])
                        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
                assert tuple(round(float(x)) for x in r["ad_pairs"][:, si, pi, qi].sum((0, 1))) == plan.pair_counts()
    # a (mass, context_mass) pair costs the non-context rows of one entry and the context rows of another
    cfg = ISAConfig(mode="adaptive", alpha_s=1.0, mass=0.6, context_mass=0.9, pseudo_block=4, block_size=16)
    _, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    mixed = r["ad_pairs"][:, 1, 0, 0, 0].sum(0) + r["ad_pairs"][:, 1, 1, 0, 1].sum(0)  # variant 0: (4, "mean")
    assert tuple(round(float(x)) for x in mixed) == plan.pair_counts()


def test_statistics_do_not_depend_on_head_groups_and_chunks(monkeypatch):
    """The measurement groups heads and chunks sampled blocks by a memory bound; one head and one block at a
    time gives the same statistics."""
    from isa_plugin.selection import ordered_measure

    model = SyntheticModel(SPEC, seed=4)
    q, k, v, layout = model.sample(0, 2)
    grid = AdaptiveGrid(alpha_s=(0.5, 1.0), mass=(0.3, 0.8, 0.95), pseudo_block=(8, 16))

    def run():
        return get_mode("adaptive").measure(q, k, v, layout, grid, block_size=16,
                                            sampler=Sampler(blocks_per_kind=6, tokens_per_block=5, generator=torch.Generator().manual_seed(0)))

    monkeypatch.setattr(ordered_measure, "_default_chunk_elems", lambda device: (1 << 24, True))
    whole = run()  # every head and block in one product
    monkeypatch.setattr(ordered_measure, "_default_chunk_elems", lambda device: (1, True))
    pieces = run()  # one head and one block at a time
    for key in whole:
        assert torch.allclose(whole[key], pieces[key], rtol=1e-5, atol=1e-9), key


def test_fit_searches_both_modes_and_keeps_fixed_results_without_adaptive():
    model = SyntheticModel(SPEC, seed=0)
    fixed_only = calibrate_synthetic(model, [0], block_size=16, blocks_per_kind=8, tokens_per_block=4)
    both = calibrate_synthetic(model, [0], grid=Grid(mass=(0.8, 0.95, 0.99), pseudo_block=(4, 16)), block_size=16,
                               blocks_per_kind=8, tokens_per_block=4)
    # the fixed mode's statistics do not depend on whether the adaptive mode is measured
    for name in model.layer_names:
        assert torch.equal(fixed_only.get(name).modes["fixed"]["num"], both.get(name).modes["fixed"]["num"])
    assert "adaptive" not in fixed_only.get(model.layer_names[0]).modes
    for per_head in (False, "auto"):
        p_fixed = fit_profile(fixed_only, 0.1, per_head=per_head)
        p_both = fit_profile(both, 0.1, per_head=per_head)
        assert p_fixed == fit_profile(both.__class__.from_state_dict(fixed_only.state_dict()), 0.1, per_head=per_head)
        for name in model.layer_names:
            f, b = p_fixed.layers[name][0], p_both.layers[name][0]
            assert b.relative_cost <= f.relative_cost + 1e-12  # more options, never more expensive
            assert b.error_target <= 0.1 * 0.85 + 1e-9 and b.error_context <= 0.1 * 0.85 + 1e-9
            if b.mode == "adaptive":
                cfg = b.to_config(block_size=16)
                assert cfg.mode == "adaptive" and cfg.pseudo_block == b.pseudo_block
    # at a loose budget and a cost model that makes the fixed mode expensive, adaptive settings win
    p = fit_profile(both, 0.5, cost_model=CostModel(a=1.0, b=50.0, adaptive_a=1.0, adaptive_b=1.0))
    assert any(p.layers[n][0].mode == "adaptive" for n in model.layer_names)


def test_state_dict_round_trip_with_adaptive_statistics():
    model = SyntheticModel(SPEC, seed=1)
    st = calibrate_synthetic(model, [0], grid=Grid(mass=(0.9,), pseudo_block=(16,)), block_size=16, blocks_per_kind=4,
                             tokens_per_block=4)
    back = CalibrationStats.from_state_dict(st.state_dict())
    assert back.grid == st.grid
    for name in model.layer_names:
        a, b = st.get(name), back.get(name)
        for mode, f in (("adaptive", "ad_num"), ("adaptive", "ad_den"), ("adaptive", "ad_pairs"), ("fixed", "num")):
            assert torch.equal(a.modes[mode][f], b.modes[mode][f])
    with pytest.raises(ValueError, match="pseudo_block"):
        CalibrationStats(Grid(mass=(0.9,), pseudo_block=(24,)), block_size=64)


def test_profile_round_trip_with_adaptive_layers(tmp_path):
    layers = {
        "a": [LayerSetting(mode="adaptive", alpha_s=0.5, mass=(0.9, 0.95, 0.99), context_mass=0.8, pseudo_block=16,
                           pseudo_keys="kmeans", error_target=0.01, error_context=0.02, relative_cost=0.4)],
        "b": [LayerSetting(alpha_s=0.25, alpha_f=0.5, alpha_ns=0.125)],
        "c": [LayerSetting(dense=True)],
    }
    prof = ThresholdProfile(layers=layers, budget={"metric": "rel_l1", "target": 0.05, "context": 0.05}, block_size=64)
    path = prof.save(tmp_path / "p.yaml")
    back = ThresholdProfile.load(path)
    assert back == prof
    cfg = back.layers["a"][0].to_config()
    assert cfg.mode == "adaptive" and cfg.mass == (0.9, 0.95, 0.99) and cfg.pseudo_block == 16 and cfg.alpha_s == 0.5
    assert cfg.context_mass == 0.8 and cfg.pseudo_keys == "kmeans"
    assert back.layers["b"][0].to_config().mode == "fixed"
    assert "mode" not in path.read_text().split("b:")[1].split("c:")[0]


def test_adaptive_cost_coefficients(tmp_path):
    from isa_plugin.calibration.cost import FLEX_DENSE_RATE, load_cost_model

    assert CostModel().adaptive_coefficients() == (1.0, 1.0, 0.0)
    assert CostModel(a=2.0, b=5.0, c=1.0, dense_a=0.7).adaptive_coefficients() == pytest.approx((0.7 / FLEX_DENSE_RATE,) * 2 + (1.0,))
    assert CostModel(adaptive_a=3.0, adaptive_b=4.0, adaptive_c=0.5).adaptive_coefficients() == (3.0, 4.0, 0.5)
    with pytest.raises(ValueError, match="adaptive_a"):
        CostModel(adaptive_a=0.0)
    path = tmp_path / "cm.json"
    path.write_text('{"cards": {"G": {"ms_per_gexact_pair": 0.8, "ms_per_gapprox_pair": 7.0, "ms_per_call": 1.5, '
                    '"adaptive_ms_per_gexact_pair": 1.2, "adaptive_ms_per_gpseudo_pair": 1.1, "adaptive_ms_per_call": 2.0}}}')
    a, b, c = load_cost_model(path, device_name="G").adaptive_coefficients()
    assert (a, b, c) == pytest.approx((1.2e-9, 1.1e-9, 2.0))


def test_inspect_shows_adaptive_layers(tmp_path, capsys):
    from isa_plugin.cli import main

    layers = {"a": [LayerSetting(mode="adaptive", alpha_s=0.5, mass=(0.9, 0.95, 0.99), pseudo_block=16, relative_cost=0.4)],
              "b": [LayerSetting(alpha_s=0.25)]}
    prof = ThresholdProfile(layers=layers, budget={"metric": "rel_l1", "target": 0.05, "context": 0.05}, block_size=64)
    path = prof.save(tmp_path / "p.yaml")
    assert main(["inspect", str(path)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:2] in ("a ", "b ")}
    assert rows["a"][2:6] == ["adaptive", "alpha_s=0.5", "mass=0.947*", "pseudo_block=16"]
    assert rows["b"][2] == "fixed" and rows["b"][6] == "sharpness=topk_mass"


def test_held_out_check_covers_adaptive_settings():
    from isa_plugin.calibration.heldout import setting_errors

    model = SyntheticModel(SPEC, seed=2)
    st = calibrate_synthetic(model, [0, 1], grid=Grid(mass=(0.8, 0.95), pseudo_block=(16,)), block_size=16,
                             blocks_per_kind=8, tokens_per_block=4)
    prof = fit_profile(st, 0.3, cost_model=CostModel(a=1.0, b=50.0, adaptive_a=1.0, adaptive_b=1.0))
    adaptive = [(n, prof.layers[n][0]) for n in model.layer_names if prof.layers[n][0].mode == "adaptive"]
    assert adaptive
    for name, s in adaptive:
        et, ec = setting_errors(st.get(name), st.grid, s)
        assert et == pytest.approx(s.error_target, abs=1e-12) and ec == pytest.approx(s.error_context, abs=1e-12)
        for i in st.sample_ids(name):  # the per-sample statistics hold the adaptive measurements too
            assert "adaptive" in st.get(name, sample=i).modes
    with pytest.raises(ValueError, match="not on the calibration grid"):
        setting_errors(st.get(adaptive[0][0]), st.grid, LayerSetting(mode="adaptive", alpha_s=1.0, mass=0.5, pseudo_block=16))
