"""The demo's outputs without running the demo: the comparison video, the warm timings, the structured call,
the GPU speed table and the figure."""

import math
import statistics

import pytest
import torch

from isa_plugin.calibration.synthetic import SyntheticSpec
from isa_plugin.demo import DIFF_GAIN, _side_by_side, _timing
from isa_plugin.demo_plot import build_figure
from isa_plugin.demo_structured import (DROPPED, EXACT, PSEUDO, SETTINGS, gpu_speed, plan_grid, recorded_gpu_speed,
                                        structured_call)
from isa_plugin.layout import Layout
from isa_plugin.plan import BlockPlan

#: a small structured call (512 tokens, 8 blocks) so that the tests run in seconds
SMALL = SyntheticSpec(frames=2, height=8, width=16, heads=2, head_dim=32, layers=2)


def test_side_by_side_is_scaled_labelled_and_shows_the_difference():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 3, 32, 48, generator=g)
    dense = torch.rand(3, 32, 48, 3, generator=g)
    isa = dense.clone()
    isa[1, :8, :8] += 0.02  # one frame differs in one corner
    frames, per_frame = _side_by_side(video, dense, isa, min_height=96)
    assert frames.shape[0] == 3 and frames.shape[2] % 16 == 0 and frames.shape[3] % 16 == 0
    assert frames.shape[2] >= 96 and frames.shape[3] >= 4 * 48 * 3  # four panels, scaled 3x
    assert math.isinf(per_frame[0]) or per_frame[0] >= 100
    assert 40 < per_frame[1] < 100
    # the difference panel (fourth) is black where the runs agree and bright where they differ
    k, bar = 3, frames.shape[2] - 96
    top = next(y for y in range(frames.shape[2]) if frames[0, :, y, 0].sum() > 0.5)  # first row of the input panel
    x4 = 3 * (48 * k + 6)
    diff0 = frames[0, :, top : top + 96, x4 : x4 + 48 * k]
    diff1 = frames[1, :, top : top + 8 * k, x4 : x4 + 8 * k]
    assert diff0.max() < 0.01 and diff1.mean() > 0.02 * DIFF_GAIN * 0.8
    # a caption (text) is drawn: the bottom strip is not uniform
    assert frames[1, :, -bar // 2 :, :].std() > 0.01


def _cmp(dense_att, isa_att, dense_tot, isa_tot):
    n = len(dense_att)
    return {"repeats": n, "timings": {"order": ["dense", "isa"] * n, "warmup": True, "statistic": "median",
                                      "dense": {"attention_ms": dense_att, "total_ms": dense_tot},
                                      "isa": {"attention_ms": isa_att, "total_ms": isa_tot}}}


def test_timing_reports_medians_of_the_alternated_runs_and_no_contradicting_end_to_end_claim():
    # a slow first dense run (cold) must not make ISA look faster end to end
    t = _timing(_cmp([300.0, 130.0, 131.0], [259.0, 260.0, 258.0], [3000.0, 1750.0, 1760.0], [1880.0, 1870.0, 1890.0]),
                "reference")
    assert t["repeats"] == 3 and t["order"] == ["dense", "isa"] * 3 and t["statistic"] == "median"
    assert t["dense"]["median_attention_ms"] == 131.0 and t["isa"]["median_attention_ms"] == 259.0
    assert t["dense"]["median_total_ms"] == 1760.0 and t["isa"]["median_total_ms"] == 1880.0
    assert t["attention_speedup"] == pytest.approx(131 / 259) and t["total_speedup"] < 1 and t["total_consistent"]
    assert t["dense"]["rest_ms"] == [2700.0, 1620.0, 1629.0]
    assert "slower" in t["summary"] and "reference" in t["summary"]
    # noise that would claim an end-to-end gain while the attention is slower is flagged, not claimed
    t = _timing(_cmp([130.0] * 3, [259.0] * 3, [1950.0] * 3, [1880.0] * 3), "reference")
    assert t["total_speedup"] > 1 and not t["total_consistent"]
    t = _timing(_cmp([140.0] * 3, [52.0] * 3, [1000.0] * 3, [910.0] * 3), "triton")
    assert t["total_consistent"] and "faster" in t["summary"]


def test_plan_grid_marks_exact_pseudo_and_dropped_blocks():
    blocks = Layout([("target", 128), ("context", 128)]).blocks(64)
    keep = torch.tensor([[[True, True, False, True]]])
    exact = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    exact[0, 0, 0] = keep[0, 0]  # a full row
    exact[0, 0, 1, 1] = exact[0, 0, 2, 0] = exact[0, 0, 3, 3] = True
    cells = plan_grid(BlockPlan.from_masks(blocks, keep, exact, pseudo_block=64))
    assert cells.tolist() == [[EXACT, EXACT, DROPPED, EXACT], [PSEUDO, EXACT, DROPPED, PSEUDO],
                              [EXACT, PSEUDO, DROPPED, PSEUDO], [PSEUDO, PSEUDO, DROPPED, EXACT]]


@pytest.fixture(scope="module")
def small_call():
    return structured_call(0.05, spec=SMALL)


def test_structured_call_plan_matches_the_blockplan(small_call):
    s = small_call
    p = s["plan"]
    nt, nc = p["blocks"]["target"], p["blocks"]["context"]
    assert s["spec"]["tokens_per_call"] == 2 * SMALL.tokens_per_video == 512 and (nt, nc) == (4, 4)
    cells = torch.tensor(p["cells"])
    assert cells.shape == (nt + nc, nt + nc)
    keep = torch.tensor(p["kv_keep"], dtype=torch.bool)
    # dropped columns are exactly the context blocks not kept; exact cells per row are the plan's counts
    assert ((cells == DROPPED).all(0) == ~keep).all() and keep[:nt].all()
    assert (cells == EXACT).sum(1).tolist() == p["exact_counts"]
    full = torch.tensor(p["full_rows"], dtype=torch.bool)
    assert ((cells[full] == EXACT) == keep[None]).all()
    assert p["per_head"]["kept_context_blocks"][p["head"]] == int(keep[nt:].sum())
    assert len(p["per_head"]["kept_context_blocks"]) == SMALL.heads
    assert 0 < p["relative_cost"] < 1 and p["error_target"] >= 0 and p["error_context"] >= 0


def test_structured_call_errors_and_flops_of_each_setting(small_call):
    s = small_call
    assert set(s["settings"]) == set(SETTINGS) == {"default", "fixed", "adaptive"}
    assert not set(s["calibration_samples"]) & set(s["held_out_samples"])
    assert "mass" in s["grid"]["adaptive"] and "mass" not in s["grid"]["fixed"]
    for name, r in s["settings"].items():
        assert r["label"] == SETTINGS[name]
        assert 0 < r["relative_cost"] <= 1 and r["gflop_per_call"] == pytest.approx(r["relative_cost"] * r["dense_gflop_per_call"])
        assert r["error_target"] >= r["mean_error_target"] >= 0 and r["error_context"] >= r["mean_error_context"] >= 0
        assert set(r["layers"]) == {"blocks.0.attn1", "blocks.1.attn1"}
        assert r["error_target"] == max(l["error_target"] for l in r["layers"].values())
    n = 2 * SMALL.tokens_per_video
    assert s["settings"]["default"]["dense_gflop_per_call"] == pytest.approx(4 * n * n * SMALL.heads * SMALL.head_dim / 1e9)
    assert {l["mode"] for l in s["settings"]["fixed"]["layers"].values()} <= {"fixed", "dense"}
    # the default ratios are the paper's: the same plan for every layer, and this is the drawn plan's layer
    assert s["settings"]["default"]["layers"][s["layer"]]["relative_cost"] == pytest.approx(s["plan"]["relative_cost"])
    with pytest.raises(ValueError, match="overlap"):
        structured_call(0.05, spec=SMALL, calibration_samples=(0, 1), held_out_samples=(1,))


def test_gpu_speed_table_is_recorded_with_card_date_and_source():
    rec = recorded_gpu_speed()
    assert rec["card"] == "NVIDIA H200" and rec["date"] == "2026-12-02" and rec["source"] == "BENCHMARKS.md"
    assert rec["versions"]["torch"].startswith("2.11") and rec["versions"]["triton"].startswith("3.6")
    rows = {(r["heads"], r["tokens"]): r for r in rec["rows"]}
    assert rows[(40, 65536)]["dense_ms"] == 141.85 and rows[(40, 65536)]["isa_ms"] == 50.96
    for r in rec["rows"]:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["isa_ms"], abs=0.01)
    g = gpu_speed(torch.device("cpu"))
    assert g["shown"] == "recorded" and g["measured"] is None and g["recorded"] == rec


def _report(structured):
    t = _timing(_cmp([130.0, 131.0, 129.0], [259.0, 260.0, 258.0], [1750.0, 1760.0, 1740.0], [1880.0, 1870.0, 1890.0]),
                "reference")
    layers = {f"blocks.{i}.attn1": {"mean_alpha_s": 1.0, "mean_alpha_f": 0.9, "mean_alpha_ns": 0.5,
                                     "measured_error_target": 0.03, "measured_error_context": 0.02} for i in range(2)}
    return {"layers": layers, "budget": 0.05, "timing": t, "device": "cpu", "kernel_path": "reference", "psnr": 45.0,
            "ssim": 0.98, "model": "random WanInContextEditPipeline (tiny)", "tokens_per_call": 360,
            "structured_call": structured, "gpu_speed": gpu_speed(torch.device("cpu"))}


def test_figure_has_no_prediction_panel_and_labels_the_gpu_table(small_call):
    import matplotlib.pyplot as plt

    fig = build_figure(_report(small_call))
    try:
        titles = [ax.get_title() for ax in fig.axes]
        texts = " ".join(titles + [t.get_text() for t in fig.texts]).lower()
        assert len(fig.axes) == 6
        assert "predict" not in texts and "cost model" not in texts
        gpu = next(t for t in titles if t.startswith("GPU speed"))
        assert "NVIDIA H200" in gpu and "2026-12-02" in gpu and "BENCHMARKS.md" in gpu
        assert any(t.startswith("plan of the default ratios") for t in titles)
        assert any("held-out error vs FLOPs" in t for t in titles)
        assert any("median of 3 alternated runs" in t for t in titles)
        assert "slower than dense" in texts
    finally:
        plt.close(fig)


def test_figure_labels_a_live_gpu_measurement_as_measured(small_call):
    import matplotlib.pyplot as plt

    report = _report(small_call)
    # what gpu_speed returned on an NVIDIA H200 (torch 2.11, triton 3.6)
    report["gpu_speed"].update(shown="measured", measured={
        "card": "NVIDIA H200", "date": "2026-12-05", "source": "measured", "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0"},
        "head_dim": 128, "baseline": "torch SDPA, default backend", "backend": "triton",
        "rows": [{"heads": 40, "tokens": 32768, "dense_ms": 34.52, "isa_ms": 12.89, "speedup": 2.678}]})
    fig = build_figure(report)
    try:
        gpu_ax = next(ax for ax in fig.axes if ax.get_title().startswith("GPU speed"))
        title = gpu_ax.get_title()
        assert "measured on this machine" in title and "NVIDIA H200, 2026-12-05" in title
        notes = " ".join(t.get_text() for t in gpu_ax.texts)
        assert "recorded on NVIDIA H200, 2026-12-02" in notes and "2.67x" in notes
    finally:
        plt.close(fig)
