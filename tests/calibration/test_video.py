"""Video reading for calibration (imageio): gif, mp4, frame folders, resizing, errors."""

import pytest
import torch

from isa_plugin.calibration.video import make_sample_video, read_video, sample_video_path, write_video


def test_bundled_sample():
    v = read_video(sample_video_path())
    assert v.shape == (17, 3, 64, 64) and 0 <= float(v.min()) and float(v.max()) <= 1
    assert (v - make_sample_video()).abs().mean() < 0.02
    assert sample_video_path().stat().st_size < 300_000


def test_mp4_folder_and_resize(tmp_path):
    video = make_sample_video(frames=9, height=32, width=48)
    write_video(tmp_path / "a.mp4", video)
    v = read_video(tmp_path / "a.mp4", frames=5, height=16, width=24)
    assert v.shape == (5, 3, 16, 24)
    folder = tmp_path / "frames"
    folder.mkdir()
    import imageio.v3 as iio

    for i, f in enumerate(video[:4]):
        iio.imwrite(folder / f"{i:03d}.png", (f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    v = read_video(folder, height=16)
    assert v.shape == (4, 3, 16, 24) and (v - torch.nn.functional.interpolate(video[:4], size=(16, 24), mode="bilinear", antialias=True)).abs().mean() < 0.02


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "none.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(tmp_path / "bad.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image frames"):
        read_video(tmp_path / "empty")
    with pytest.raises(ValueError, match="frames"):
        read_video(sample_video_path(), frames=100)
