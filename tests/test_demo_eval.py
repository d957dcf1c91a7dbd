"""The main job end to end at its smallest size: `isa demo`, then `isa eval` on a saved checkpoint."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _isa(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "isa_plugin", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = _isa("demo", "--out", str(out), "--steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    return demo_run[0]


def test_demo_summary(demo_run):
    out = demo_run[1]
    assert "PSNR" in out and "self-attention: dense" in out and "median of 3 runs each, alternated" in out
    # on a CPU: ISA is said to be slower, and no end-to-end gain is claimed
    assert "ISA is slower here" in out and "faster" not in out
    assert "default ratios" in out and "calibrated, fixed mode" in out and "calibrated, fixed + adaptive modes" in out
    assert "recorded in BENCHMARKS.md: NVIDIA H200, 2026-12-02" in out and "65,536 tokens" in out


def test_demo_outputs(demo_dir):
    import imageio.v3 as iio
    import matplotlib.image as mpimg

    from isa_plugin.profile import ThresholdProfile

    report = json.loads((demo_dir / "report.json").read_text())
    for key in ("psnr", "ssim", "dense", "isa", "layers", "fallbacks", "calibration_s", "timing", "structured_call", "gpu_speed"):
        assert key in report
    assert "gpu_prediction" not in report
    # warm timings: a warm-up of both, then dense and ISA alternated; medians of the repeats
    t = report["timing"]
    assert t["warmup"] and t["repeats"] == 3 and t["order"] == ["dense", "isa"] * 3 and t["statistic"] == "median"
    for run in ("dense", "isa"):
        assert len(t[run]["attention_ms"]) == len(t[run]["total_ms"]) == 3
        assert t[run]["median_attention_ms"] == statistics.median(t[run]["attention_ms"])
        assert t[run]["median_total_ms"] == statistics.median(t[run]["total_ms"])
        assert report[run]["attention_ms"] == t[run]["median_attention_ms"] > 0
        assert report[run]["total_ms"] == t[run]["median_total_ms"] >= report[run]["attention_ms"]
        assert all(tot >= att for tot, att in zip(t[run]["total_ms"], t[run]["attention_ms"]))
    assert report["kernel_path"] == "reference" and "slower" in t["summary"]
    # the structured call: its plan, and the held-out error and FLOPs of the default ratios and both calibrations
    s = report["structured_call"]
    assert s["spec"]["tokens_per_call"] == 2048 and len(s["plan"]["cells"]) == sum(s["plan"]["blocks"].values())
    assert set(s["settings"]) == {"default", "fixed", "adaptive"}
    for r in s["settings"].values():
        assert r["error_target"] >= 0 and r["error_context"] >= 0 and 0 < r["relative_cost"] <= 1 and r["gflop_per_call"] > 0
    assert report["structured_call_s"] < 60
    # the GPU table, labelled with card and date (measured only where a CUDA GPU is present)
    g = report["gpu_speed"]
    assert g["shown"] == "recorded" and g["measured"] is None
    assert g["recorded"]["card"] == "NVIDIA H200" and g["recorded"]["date"] == "2026-12-02" and g["recorded"]["rows"]
    assert report["isa_calls"] > 0
    assert report["ssim"] <= 1.0 and report["psnr"] > 0
    layers = report["layers"]
    assert layers and all({"mode", "settings", "measured_error_target"} <= set(l) for l in layers.values())
    # the settings of a layer are its mode's (the fixed mode: the three ratios)
    assert all({"alpha_s", "alpha_f", "alpha_ns"} <= set(l["settings"]) for l in layers.values() if l["mode"] == "fixed")
    # the video decodes: input | dense | ISA side by side
    frames = iio.imread(demo_dir / "side_by_side.mp4", index=None)
    assert frames.ndim == 4 and frames.shape[0] == report["preset"]["frames"]
    assert frames.shape[2] >= 240 and frames.shape[2] >= 4 * report["preset"]["width"]  # scaled, four panels
    assert len(report["psnr_per_frame"]) == frames.shape[0]
    # the PNG is an image with content (a plot, not a blank canvas)
    img = mpimg.imread(demo_dir / "plot.png")
    assert img.ndim == 3 and img.shape[0] > 100 and np.std(img) > 0.01
    assert set(ThresholdProfile.load(demo_dir / "profile.yaml").layers) == set(layers)


def test_eval_on_saved_checkpoint(demo_dir, tmp_path):
    from isa_plugin.calibration.video import sample_video_path
    from isa_plugin.pipelines.tiny import PRESETS, build_tiny_wan_icl_pipeline

    ckpt = tmp_path / "ckpt"
    build_tiny_wan_icl_pipeline(PRESETS["tiny"]).save_pretrained(ckpt)
    out = tmp_path / "eval.json"
    p = PRESETS["tiny"]
    r = _isa("eval", "--pipeline", str(ckpt), "--profile", str(demo_dir / "profile.yaml"), "--videos", str(sample_video_path()),
             "--prompts", "make it winter", "--steps", "2", "--height", str(p.height), "--width", str(p.width),
             "--frames", str(p.frames), "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LPIPS: skipped" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert len(res) == 1 and res[0]["psnr"] > 0 and res[0]["isa_calls"] > 0
    assert res[0]["layer_errors"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "--pipeline", "/nonexistent/ckpt", "--profile", "p.yaml", "--videos", "v.mp4"], "no such"),
        (["eval", "--pipeline", "x", "--profile", "p.yaml", "--videos", "a.mp4", "b.mp4", "--prompts", "1", "2", "3"], "prompts"),
        (["eval", "--pipeline", "x", "--profile", "p.yaml", "--videos", "a.mp4", "--steps", "0"], "--steps 0"),
        (["demo", "--size", "huge"], "size='huge'"),
        (["demo", "--budget", "2"], "argument --budget: budget=2.0 is out of range"),
        (["demo", "--device", "gpu"], "--device='gpu' is not a device name"),
    ],
)
def test_bad_arguments_one_line(args, needle, tmp_path):
    r = _isa(*args, cwd=tmp_path)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("isa: error:") and needle in lines[0], r.stderr
