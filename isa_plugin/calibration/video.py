"""Reading sample videos for calibration (mp4 / gif / webm / a folder of frames) through imageio."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

__all__ = ["read_video", "write_video", "sample_video_path", "sample_media_paths", "make_sample_video", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_DATA = Path(__file__).resolve().parent.parent / "data"


def sample_video_path() -> Path:
    """The small sample video bundled with isa-plugin (17 frames, 64x64, moving shapes)."""
    return _DATA / "sample.gif"


def sample_media_paths() -> List[Path]:
    """The bundled calibration samples (two 17-frame 64x64 videos; image pipelines take their first frames)."""
    return [_DATA / "sample.gif", _DATA / "sample_b.gif"]


def _frames_from_file(path: Path) -> List[np.ndarray]:
    import imageio.v3 as iio

    try:
        arr = iio.imread(path, index=None)
    except Exception as e:
        raise ValueError(f"cannot read video {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "supported: mp4/webm/mov (ffmpeg), gif, or a folder of image frames") from None
    arr = np.asarray(arr)
    if arr.ndim == 3:  # a single image or a grayscale video
        arr = arr[None] if arr.shape[-1] in (3, 4) else arr[..., None]
    return list(arr)


def read_video(path: Union[str, Path], *, frames: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None) -> torch.Tensor:
    """Read a video as float frames in [0, 1].

    Args:
        path: an mp4/webm/mov/gif file, or a folder of image frames (sorted by name).
        frames: keep the first ``frames`` frames (all when None).
        height, width: resize every frame (bilinear, antialiased) when given; one of them alone keeps the
            aspect ratio.

    Returns:
        [F, 3, H, W] float32 in [0, 1].

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: unreadable file, an empty folder, or fewer frames than ``frames``.
    """
    import imageio.v3 as iio

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video {str(p)!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(p)!r} holds no image frames ({', '.join(IMAGE_SUFFIXES)})")
        imgs = [np.asarray(iio.imread(f)) for f in files[: frames or None]]
    else:
        imgs = _frames_from_file(p)
    if frames is not None:
        if len(imgs) < frames:
            raise ValueError(f"video {str(p)!r} has {len(imgs)} frames; {frames} were asked for")
        imgs = imgs[:frames]
    out = []
    for im in imgs:
        if im.ndim == 2:
            im = im[..., None]
        if im.shape[-1] == 1:
            im = np.repeat(im, 3, -1)
        im = im[..., :3]
        t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()
        out.append(t / (65535.0 if im.dtype == np.uint16 else 255.0) if im.dtype != np.float32 else t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"frames of {str(p)!r} differ in size {sorted(shapes)}")
    video = torch.stack(out).clamp(0, 1)
    if height is not None or width is not None:
        h0, w0 = video.shape[-2:]
        h = height or max(1, round(h0 * width / w0))
        w = width or max(1, round(w0 * height / h0))
        if (h, w) != (h0, w0):
            video = torch.nn.functional.interpolate(video, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return video


def write_video(path: Union[str, Path], video: torch.Tensor, fps: int = 8) -> Path:
    """Write [F, 3, H, W] frames in [0, 1] (gif, mp4 or webm by suffix)."""
    import imageio.v3 as iio

    path = Path(path)
    arr = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, arr, duration=int(1000 / fps), loop=0)
    else:
        iio.imwrite(path, arr, fps=fps)
    return path


def make_sample_video(frames: int = 17, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A deterministic test video: a textured background panning under two moving shapes. [F, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    base = torch.rand(3, 3, generator=g)
    out = []
    for f in range(frames):
        t = f / max(frames - 1, 1)
        bg = torch.stack([
            0.5 + 0.25 * torch.sin(2 * np.pi * (xx / width * 2 + t) + 3 * c) * torch.cos(2 * np.pi * yy / height) for c in range(3)
        ])
        cx, cy = width * (0.2 + 0.6 * t), height * 0.35
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (0.15 * width) ** 2).float()
        sx, sy = width * (0.75 - 0.5 * t), height * (0.7 + 0.1 * np.sin(2 * np.pi * t))
        square = (((xx - sx).abs() < 0.12 * width) & ((yy - sy).abs() < 0.12 * height)).float()
        img = bg * (1 - disc) + disc * base[0][:, None, None]
        img = img * (1 - square) + square * base[1][:, None, None]
        out.append(img)
    return torch.stack(out).clamp(0, 1)
