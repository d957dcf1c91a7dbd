"""The ``isa`` CLI end to end on a tiny random WanInContextEditPipeline (CPU)."""

import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")  # diffusers loads Wan (fp32-kept modules) through accelerate

from isa_plugin.calibration.video import sample_video_path  # noqa: E402
from isa_plugin.cli import CLIError, command, main  # noqa: E402
from isa_plugin.profile import ThresholdProfile  # noqa: E402


def _save_pipe(path, layers=2, heads=2):
    from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline

    preset = TinyPreset(heads=heads, head_dim=32, layers=layers, height=64, width=64, frames=9, block_size=8, steps=4)
    build_tiny_wan_icl_pipeline(preset).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"ok": _save_pipe(root / "ok"), "other": _save_pipe(root / "other", layers=3)}


@pytest.fixture(scope="module")
def profile(pipes, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "profile.yaml"
    rc = main(["calibrate", "--pipeline", pipes["ok"], "--adapter", "wan-icl", "--videos", str(sample_video_path()),
               "--prompts", "make it winter", "--budget", "0.05", "--steps", "4", "--calib-steps", "2",
               "--height", "64", "--width", "64", "--frames", "9", "--block-size", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_calibrate_writes_a_profile(profile, pipes):
    prof = ThresholdProfile.load(profile)
    assert prof.layer_names == ["blocks.0.attn1", "blocks.1.attn1"]
    on = prof.calibrated_on
    assert on["transformer_class"] == "WanTransformer3DModel" and on["resolution"] == [64, 64] and on["frames"] == 9
    assert on["steps"] == 4 and on["calibrated_steps"] == [0, 3] and on["num_samples"] == 1
    assert on["attention_calls"] == 2 * 2 * 2  # 2 layers x 2 steps x (cond, uncond)
    for s in (x for ss in prof.layers.values() for x in ss):
        assert s.dense or (s.error_target <= 0.05 and s.error_context <= 0.05)
    assert prof.block_size == 8


def test_inspect_prints_and_plots(profile, capsys, tmp_path):
    png = tmp_path / "p.png"
    assert main(["inspect", str(profile), "--plot", str(png), "--diagnostics"]) == 0
    out = capsys.readouterr().out
    assert "ctx mass" in out
    assert "blocks.0.attn1" in out and "blocks.1.attn1" in out and "alpha_s" in out and "mean predicted cost" in out
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate(profile, pipes, capsys):
    assert main(["validate", str(profile), "--pipeline", pipes["ok"], "--adapter", "wan-icl"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(profile), "--pipeline", pipes["ok"], "--adapter", "ltx-condition"]) == 2
    assert "serves" in capsys.readouterr().err
    assert main(["validate", str(profile), "--pipeline", pipes["other"]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config hash" in err and "Traceback" not in err
    assert main(["validate", str(profile), "--pipeline", pipes["ok"], "--height", "128", "--width", "64"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and err.startswith("isa: warning:"), err  # logged and warned: printed once


def test_profile_applies(profile, pipes):
    from isa_plugin import apply_isa, remove_isa, stats
    from isa_plugin.pipelines import WanInContextEditPipeline

    pipe = WanInContextEditPipeline.from_pretrained(pipes["ok"])
    pipe.set_progress_bar_config(disable=True)
    apply_isa(pipe, ThresholdProfile.load(profile))
    from isa_plugin.calibration.video import read_video

    pipe(prompt="x", video=read_video(sample_video_path(), frames=9), height=64, width=64, num_inference_steps=1, output_type="latent")
    assert sum(v["isa_calls"] + v["fallbacks"] for v in stats(pipe).values()) == 4
    remove_isa(pipe)


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "/nonexistent/p.yaml"], "does not exist"),
    (["calibrate", "--pipeline", "/nonexistent", "--videos", "v.mp4", "--out", "p.yaml"], "does not exist"),
    (["calibrate", "--pipeline", "/tmp", "--videos", str(sample_video_path()), "--out", "/tmp/x.yaml"], "model_index.json"),
    (["calibrate", "--pipeline", "{ok}", "--adapter", "nope", "--videos", str(sample_video_path()), "--out", "/tmp/x.yaml"], "unknown adapter"),
    (["calibrate", "--pipeline", "{ok}", "--adapter", "ltx-condition", "--videos", str(sample_video_path()), "--out", "/tmp/x.yaml"], "serves"),
    (["calibrate", "--pipeline", "{ok}", "--videos", str(sample_video_path()), "--budget", "-1", "--out", "/tmp/x.yaml"], "budget"),
])
def test_user_errors_are_one_line(argv, needle, pipes, capsys):
    argv = [a.replace("{ok}", pipes["ok"]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("isa: error:") and err.count("\n") == 1 and needle in err, err


def test_corrupt_and_hostile_profiles_in_a_subprocess(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    r = subprocess.run([sys.executable, "-m", "isa_plugin", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("isa: error:")
    assert "pwned" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "isa_plugin", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "calibrate" in r.stdout and "validate" in r.stdout


def test_adding_a_subcommand(capsys):
    from isa_plugin import cli

    @command("hello-test", help="say hello", arguments=lambda p: p.add_argument("--name", default="world"))
    def hello(args):
        if args.name == "bad":
            raise CLIError("bad name")
        print(f"hello {args.name}")
        return 0

    try:
        assert main(["hello-test", "--name", "isa"]) == 0
        assert capsys.readouterr().out == "hello isa\n"
        assert main(["hello-test", "--name", "bad"]) == 2
        assert capsys.readouterr().err == "isa: error: bad name\n"
    finally:
        cli._COMMANDS.pop("hello-test")


def test_calibrate_adaptive(pipes, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["calibrate", "--pipeline", pipes["ok"], "--adapter", "wan-icl", "--videos", str(sample_video_path()),
               "--budget", "0.2", "--steps", "2", "--calib-steps", "1", "--height", "64", "--width", "64", "--frames", "9",
               "--block-size", "8", "--adaptive", "--out", str(out), "--no-progress"])
    assert rc == 0
    prof = ThresholdProfile.load(out)
    assert prof.calibrated_on["grid"]["pseudo_block"] == [8] and prof.calibrated_on["grid"]["mass"]
    for s in (x for ss in prof.layers.values() for x in ss):
        assert s.dense or (s.error_target <= 0.2 and s.error_context <= 0.2)
        if s.mode == "adaptive":
            assert s.to_config(block_size=8).mode == "adaptive"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn1" in printed
    assert (" adaptive " in printed) == any(s.mode == "adaptive" for ss in prof.layers.values() for s in ss)


@pytest.mark.parametrize("argv", [
    ["calibrate", "--pipeline", "/nonexistent", "--videos", "v.mp4", "--out", "p.yaml", "--budget", "2"],
    ["calibrate", "--pipeline", "/nonexistent", "--videos", "v.mp4", "--out", "p.yaml", "--budget", "0"],
    ["calibrate", "--pipeline", "/nonexistent", "--videos", "v.mp4", "--out", "p.yaml", "--context-budget", "1"],
    ["demo", "--budget", "2", "--out", "/nonexistent/never-written"],
    ["demo", "--budget", "nan", "--out", "/nonexistent/never-written"],
])
def test_budget_checked_at_parse_time(argv, capsys, monkeypatch):
    """Every command checks its budget with config.validate_budget before it runs (nothing is loaded)."""
    from isa_plugin import calibrate_cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("isa: error: argument --") and "use a value in (0, 1), e.g. 0.05" in err, err


def test_budget_arg_message_is_the_validators():
    import argparse

    from isa_plugin.cli import budget_arg
    from isa_plugin.validation import validate_budget

    assert budget_arg()("0.1") == 0.1
    with pytest.raises(argparse.ArgumentTypeError) as e:
        budget_arg()("abc")
    with pytest.raises(ValueError) as v:
        validate_budget("abc")
    assert str(e.value) == str(v.value)


def test_debug_after_the_subcommand(capsys):
    assert main(["inspect", "/nonexistent/p.yaml"]) == 2
    for argv in (["--debug", "inspect", "/nonexistent/p.yaml"], ["inspect", "/nonexistent/p.yaml", "--debug"]):
        with pytest.raises(FileNotFoundError):
            main(argv)


@pytest.mark.parametrize("device,needle", [("gpu", "is not a device name; use 'cuda'"), ("cuda", "no CUDA GPU is visible")])
def test_bad_device_is_one_line(device, needle, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["demo", "--device", device, "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("isa: error: --device") and needle in err and "cpu" in err, err


def test_inspect_of_a_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "profile.yaml" in err and "does not exist" not in err


def test_eval_options_have_help_and_progress_switch():
    from isa_plugin.cli import _load_extensions, build_parser

    _load_extensions()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    missing = [a.dest for a in sub._actions if not a.help]
    assert not missing, missing
    assert "calibrate --help" not in sub.format_help()
    for flag in ("--no-progress", "--quiet"):
        args = parser.parse_args(["eval", "--pipeline", "p", "--profile", "x.yaml", "--videos", "v.mp4", flag])
        assert args.no_progress


def test_progress_bars_are_labelled():
    from isa_plugin.evaluate import _progress_label

    class Pipe:
        _progress_bar_config = {"disable": True}

        def set_progress_bar_config(self, **kw):
            self._progress_bar_config = kw

    pipe = Pipe()
    with _progress_label(pipe, "video 1/2 dense, run 1/2"):
        assert pipe._progress_bar_config == {"disable": True, "desc": "video 1/2 dense, run 1/2"}
    assert pipe._progress_bar_config == {"disable": True}


def test_profile_files_keep_the_umask_mode(profile, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = ThresholdProfile.load(profile).save(tmp_path / "p.yaml")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
    assert out.name in modes


def test_calibrate_plan_reuse(pipes, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["calibrate", "--pipeline", pipes["ok"], "--adapter", "wan-icl", "--videos", str(sample_video_path()),
               "--budget", "0.3", "--steps", "3", "--calib-steps", "2", "--height", "64", "--width", "64", "--frames", "9",
               "--block-size", "8", "--plan-reuse", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "plan reuse" in printed and "age 2" in printed
    prof = ThresholdProfile.load(out)
    reuse = [s.to_config().plan_reuse for ss in prof.layers.values() for s in ss if not s.dense]
    assert reuse and all(1 <= r <= 3 for r in reuse)
    assert main(["calibrate", "--pipeline", pipes["ok"], "--videos", "v.mp4", "--out", str(out), "--plan-reuse", "0"]) == 2
    assert "--plan-reuse 0 must be at least 1" in capsys.readouterr().err


def test_calibrate_bucket_budgets(pipes, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["calibrate", "--pipeline", pipes["ok"], "--adapter", "wan-icl", "--videos", str(sample_video_path()),
               "--steps", "4", "--calib-steps", "4", "--height", "64", "--width", "64", "--frames", "9", "--block-size", "8",
               "--timestep-buckets", "2", "--bucket-budgets", "0.05", "0.3", "--out", str(out), "--no-progress"])
    assert rc == 0
    prof = ThresholdProfile.load(out)
    assert prof.num_buckets == 2
    assert prof.calibrated_on["bucket_budgets"] == [{"target": 0.05, "context": 0.05}, {"target": 0.3, "context": 0.3}]
    capsys.readouterr()
    assert main(["calibrate", "--pipeline", pipes["ok"], "--videos", "v.mp4", "--out", str(out), "--timestep-buckets", "2",
                 "--bucket-budgets", "0.05"]) == 2
    assert "--bucket-budgets gives 1 budget(s) for --timestep-buckets 2" in capsys.readouterr().err
    assert main(["calibrate", "--pipeline", pipes["ok"], "--videos", "v.mp4", "--out", str(out), "--bucket-budgets", "3"]) == 2
