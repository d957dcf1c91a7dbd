"""``isa edit`` end to end on the tiny pipeline of every registered family (CPU, 2 steps, the bundled samples)."""

import pytest

pytest.importorskip("diffusers")

from isa_plugin.adapters import registered_families  # noqa: E402
from isa_plugin.calibration.video import read_video, sample_media_paths, sample_video_path  # noqa: E402
from isa_plugin.cli import main  # noqa: E402

FAMILIES = sorted({f.name for f in registered_families().values()})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder of its tiny pipeline (built and saved on first use)."""
    root, folders = tmp_path_factory.mktemp("edit-pipes"), {}

    def get(family):
        if family not in folders:
            folders[family] = _save(family, root / family)
        return folders[family][0]

    def options(family):
        get(family)
        return folders[family][1]

    get.options = options
    return get


def _save(family, folder):
    """Save the tiny pipeline of ``family``; returns (folder, (makes a video, --frames options of the smallest run))."""
    from isa_plugin.calibration.runners import runner_for
    from isa_plugin.edit_cli import _call_takes
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    pipe.save_pretrained(folder)
    runner, video = runner_for(pipe), _call_takes(pipe, "num_frames")
    if runner.media == "video":
        frames = ["--frames", str(1 + runner.temporal_factor(pipe))]
    else:
        frames = ["--frames", "5"] if video else []
    return str(folder), (video, frames)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_every_family(family, saved, tmp_path, capsys):
    folder = saved(family)
    makes_video, frames = saved.options(family)
    out = tmp_path / ("edited.mp4" if makes_video else "edited.png")
    # image pipelines through the LIVEditor script's spellings and an explicit --config defaults, video
    # pipelines through isa's own spellings and the default ISA setting
    io = ["--input", str(sample_media_paths()[1]), "--output", str(out), "--config", "defaults"] if not makes_video else \
        ["--video", str(sample_video_path()), "--out", str(out)]
    rc = main(["edit", "--pipeline", folder, *io, "--prompt", "make it winter", "--steps", "2", *frames, "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    result = read_video(out)
    assert result.shape[1:] == (3, 64, 64) and (result.shape[0] > 1) == makes_video
    assert "ISA: default ratios" in printed.out and " ISA calls" in printed.out and "dense fallbacks" in printed.out
    assert "edited in" in printed.out and f"wrote {out}" in printed.out


def _profile_for(folder, path, *, block_size=16):
    """A uniform profile made for the pipeline's transformer (as isa calibrate records it)."""
    from isa_plugin import ISAConfig, ThresholdProfile
    from isa_plugin.adapters import family_for
    from isa_plugin.pipeline_loading import load_transformer_skeleton
    from isa_plugin.profile import config_hash

    tr = load_transformer_skeleton(folder)
    names = list(family_for(tr).self_attention_layers(tr))
    on = {"transformer_class": type(tr).__name__, "config_hash": config_hash(tr)}
    ThresholdProfile.uniform(names, ISAConfig(block_size=block_size), calibrated_on=on).save(path)
    return str(path)


def test_edit_with_a_profile_and_dense(saved, tmp_path, capsys):
    folder = saved("wan")
    profile = _profile_for(folder, tmp_path / "p.yaml")
    common = ["edit", "--pipeline", folder, "--video", str(sample_video_path()), "--prompt", "x", "--steps", "2",
              "--frames", "5", "--size", "32x48"]
    assert main(common + ["--out", str(tmp_path / "isa.gif"), "--profile", profile]) == 0
    printed, bar = capsys.readouterr()
    assert "editing (ISA): 100%" in bar and "00:00<00:00" in bar  # diffusers' bar, with the time left
    assert f"ISA: profile {profile}" in printed and "2 layers: 8 ISA calls (executors: reference 8)" in printed
    assert read_video(tmp_path / "isa.gif").shape == (5, 3, 32, 48)
    assert main(common + ["--out", str(tmp_path / "dense.gif"), "--dense", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ISA: off" in printed and "ISA calls" not in printed
    assert read_video(tmp_path / "dense.gif").shape == (5, 3, 32, 48)


def test_edit_a_pipeline_that_runs_isa_by_default(saved, tmp_path, capsys):
    folder = saved("liveditor")
    common = ["edit", "--pipeline", folder, "--video", str(sample_video_path()), "--prompt", "x", "--steps", "1",
              "--frames", "5", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "isa.gif")]) == 0
    printed = capsys.readouterr().out
    assert "ISA: default ratios (LIVEditorPipeline's own ISA settings" in printed and "2 layers: 2 ISA calls" in printed
    assert main(common + ["--out", str(tmp_path / "dense.gif"), "--dense"]) == 0
    printed = capsys.readouterr().out
    assert "ISA: off" in printed and "ISA calls" not in printed


@pytest.mark.parametrize("case,needle", [
    ("missing pipeline", "no such folder"),
    ("missing video", "no such file or folder"),
    ("unreadable video", "cannot read video"),
    ("profile for another model", "calibrated for WanTransformer3DModel, not LTXVideoTransformer3DModel"),
    ("size off the grid", "takes sides that are multiples of 16; use e.g. --size 48x64 or 64x64"),
    ("frames off the grid", "takes 1 + 4k frames; use e.g. --frames 5 or 9"),
    ("profile and dense", "argument --dense: not allowed with argument --profile"),
    ("config and dense", "argument --dense: not allowed with argument --config"),
    ("image out for a video", "makes a video; give a file name ending"),
    ("frames for an image", "edits one image; leave --frames out"),
])
def test_user_errors_are_one_line(case, needle, saved, tmp_path, capsys):
    wan, video, out = saved("wan"), str(sample_video_path()), str(tmp_path / "o.mp4")
    (tmp_path / "bad.mp4").write_text("not a video")
    argv = {
        "missing pipeline": ["--pipeline", str(tmp_path / "nope"), "--video", video],
        "missing video": ["--pipeline", wan, "--video", str(tmp_path / "none.mp4")],
        "unreadable video": ["--pipeline", wan, "--video", str(tmp_path / "bad.mp4")],
        "profile for another model": ["--pipeline", saved("ltx"), "--video", video,
                                      "--profile", _profile_for(wan, tmp_path / "p.yaml")],
        "size off the grid": ["--pipeline", wan, "--video", video, "--size", "60x64"],
        "frames off the grid": ["--pipeline", wan, "--video", video, "--frames", "6"],
        "profile and dense": ["--pipeline", wan, "--video", video, "--profile", "p.yaml", "--dense"],
        "config and dense": ["--pipeline", wan, "--video", video, "--config", "defaults", "--dense"],
        "image out for a video": ["--pipeline", wan, "--video", video, "--out", str(tmp_path / "o.png")],
        "frames for an image": ["--pipeline", saved("flux"), "--input", video, "--output", str(tmp_path / "o.png"),
                                "--frames", "3"],
    }[case]
    if "--out" not in argv and "--output" not in argv:
        argv += ["--out", out]
    capsys.readouterr()  # what building the pipelines printed
    assert main(["edit", *argv, "--prompt", "x", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("isa: error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.mp4").exists()
