"""LIVEditor's sampling recipe, as the released model is meant to be run: sampler, input geometry, defaults.

Plain functions and constants, used by :class:`~isa_plugin.pipelines.LIVEditorPipeline` (which applies
them by default, ``recipe="authors"``) and usable on their own:

- :func:`liveditor_sigmas` / :func:`set_liveditor_timesteps`: the sampler's schedule. LIVEditor samples
  with flow-matching UniPC (order 2, bh2, predict x0), 1000 training timesteps, shift 6.0, 32 steps. Its
  schedule starts from the *training* table's largest sigma, ``1 - 1/1000`` (stored as float32), not from
  1.0: the unshifted sigmas are ``linspace(0.999, 0, steps + 1)[:-1]``, shifted by
  ``shift * s / (1 + (shift - 1) * s)`` in float64; the timesteps are those sigmas x 1000 truncated to
  integers; a final sigma 0 closes the list. At 32 steps: sigmas 0.99983, 0.99448, ..., 0.2855, 0.16202;
  timesteps 999, 994, ..., 382, 285, 162. (diffusers' ``use_flow_sigmas`` default starts at 1.0 and ends
  at 0.16649 / timestep 166.)
- :func:`bucket_size` / :func:`resize_to_bucket`: every source is resized to the nearest of five 540p
  aspect buckets (:data:`ASPECT_BUCKETS`), aspect kept (bicubic, antialiased, the short side made to
  cover the bucket, rounded up to a multiple of 16), then center-cropped to the bucket.
- :func:`resample_fps`: the source is read at 16 fps (nearest earlier-or-equal source frame in time) and
  the edit is written at 16 fps.
- :func:`trim_frames`: only the first ``1 + 4k`` frames enter (the VAE's temporal factor 4).
- :data:`NEGATIVE_PROMPT`: the unconditional prompt of the released configuration, and :data:`SEED` 42.

Example:
    >>> sched = liveditor_scheduler(); set_liveditor_timesteps(sched, 32)
    >>> sched.timesteps[-3:]          # tensor([382, 285, 162])
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ASPECT_BUCKETS", "NEGATIVE_PROMPT", "SEED", "FPS", "liveditor_sigmas", "set_liveditor_timesteps",
    "bucket_size", "resize_to_bucket", "resample_fps", "trim_frames", "video_to_tensor",
]

#: the released configuration's negative prompt (its ``n_prompt``; differs from Wan's stock one in places)
NEGATIVE_PROMPT = (
    "色调艳丽, 过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，稳定s的背景，三条腿，背景人很多，倒着走"
)
#: sampling seed of the recipe
SEED = 42
#: frame rate the source is resampled to and the edit is written at
FPS = 16
#: the five 540p buckets as (width, height), keyed by aspect (width : height)
ASPECT_BUCKETS = {(9, 16): (544, 960), (1, 1): (720, 720), (16, 9): (960, 544), (1, 2): (480, 960), (2, 1): (960, 480)}
_ALIGN = 16


# ------------------------------------------------------------------------------------------ sampler
def liveditor_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The recipe's unshifted sigmas: ``linspace(sigma_max, 0, steps + 1)[:-1]`` with ``sigma_max = 1 - 1/N``.

    ``sigma_max`` is the largest sigma of the N-step training table, taken as float32 (0.999 -> 0.99900001).
    Shift them with the scheduler's ``flow_shift`` (what :func:`set_liveditor_timesteps` does).

    Args:
        num_inference_steps: steps (> 0).
        num_train_timesteps: training timesteps N (1000).

    Returns:
        [num_inference_steps] float64, decreasing.

    Raises:
        ValueError: a non-positive count.

    Example:
        >>> liveditor_sigmas(32)[:2]      # array([0.999, 0.96778...])
    """
    for name, value in (("num_inference_steps", num_inference_steps), ("num_train_timesteps", num_train_timesteps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1].copy()


def set_liveditor_timesteps(scheduler, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
    """Set ``scheduler``'s steps to the recipe's schedule (see the module docstring).

    Args:
        scheduler: a diffusers ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True`` (its ``flow_shift`` is
            applied; :func:`~isa_plugin.pipelines.liveditor_pipeline.liveditor_scheduler` makes one).
        num_inference_steps: steps (the recipe: 32).
        device: where the timesteps go.

    Raises:
        ValueError: a scheduler without flow sigmas, or a bad step count.

    Example:
        >>> set_liveditor_timesteps(pipe.scheduler, 32, device="cuda")
    """
    if not getattr(scheduler.config, "use_flow_sigmas", False):
        raise ValueError(
            f"{type(scheduler).__name__} has no use_flow_sigmas=True: the recipe's schedule needs a flow-sigma UniPC "
            "scheduler (liveditor_scheduler()); pass recipe='plain' to keep your scheduler's own schedule"
        )
    sigmas = liveditor_sigmas(num_inference_steps, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(device=device, sigmas=sigmas)


# ------------------------------------------------------------------------------------------ input
def bucket_size(height: int, width: int) -> Tuple[int, int]:
    """The recipe's bucket for a ``height`` x ``width`` source: the bucket whose aspect is nearest (first on ties).

    Returns:
        ``(height, width)`` of the bucket, e.g. ``(544, 960)`` for 16:9.

    Example:
        >>> bucket_size(1080, 1920)       # (544, 960)
    """
    ratio = width / height
    key = min(ASPECT_BUCKETS, key=lambda k: abs(k[0] / k[1] - ratio))
    w, h = ASPECT_BUCKETS[key]
    return h, w


def resize_to_bucket(frames: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resize [F, C, H, W] frames to cover a bucket (aspect kept, 16-aligned), then center-crop to it.

    Args:
        frames: [F, C, H, W] float frames (any range; resampling is bicubic with antialiasing).
        size: ``(height, width)`` to cover and crop to; default :func:`bucket_size` of the frames.

    Returns:
        [F, C, height, width] in ``frames``' dtype.

    Example:
        >>> resize_to_bucket(torch.rand(5, 3, 720, 1280)).shape      # [5, 3, 544, 960]
    """
    _, _, h, w = frames.shape
    th, tw = bucket_size(h, w) if size is None else size
    ratio = w / h
    if ratio > tw / th:  # wider than the bucket: match heights
        nh, nw = th, int(th * ratio)
    else:
        nw, nh = tw, int(tw / ratio)
    nh, nw = -(-nh // _ALIGN) * _ALIGN, -(-nw // _ALIGN) * _ALIGN
    out = F.interpolate(frames.float(), size=(nh, nw), mode="bicubic", antialias=True).to(frames.dtype)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return out[:, :, top:top + th, left:left + tw].contiguous()


def resample_fps(frames: torch.Tensor, fps: Optional[float], target_fps: float = FPS) -> torch.Tensor:
    """Resample [F, ...] frames from ``fps`` to ``target_fps`` by taking, for every output time, the latest
    source frame at or before it (frames are dropped or repeated; none is blended).

    Args:
        frames: [F, ...] frames.
        fps: the source's frame rate; None or equal to ``target_fps`` returns ``frames`` unchanged.
        target_fps: the output rate (16).

    Returns:
        [ceil(F * target_fps / fps), ...] frames.

    Raises:
        ValueError: a non-positive ``fps``.

    Example:
        >>> resample_fps(torch.rand(60, 3, 8, 8), fps=30).shape[0]     # 32
    """
    if fps is None or fps == target_fps:
        return frames
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps={fps!r} must be a positive number (the source video's frame rate)")
    n = frames.shape[0]
    count = max(1, math.ceil(n * target_fps / fps - 1e-9))
    index = [min(n - 1, int(math.floor(i * fps / target_fps + 1e-9))) for i in range(count)]
    return frames[index]


def trim_frames(frames: torch.Tensor, temporal_factor: int = 4) -> torch.Tensor:
    """Keep the first ``1 + k * temporal_factor`` frames of [F, ...] (the most the VAE takes).

    Example:
        >>> trim_frames(torch.rand(83, 3, 8, 8)).shape[0]    # 81
    """
    keep = 1 + (frames.shape[0] - 1) // temporal_factor * temporal_factor
    return frames[:keep]


def video_to_tensor(video) -> torch.Tensor:
    """One source video as [F, C, H, W] float32 in [0, 1].

    Accepts a list of PIL images, a [F, H, W, C] numpy array (uint8 is scaled by 1/255, floats are taken
    as [0, 1]) or a [F, C, H, W] tensor in [0, 1] (uint8 scaled by 1/255).

    Raises:
        ValueError: another rank or type.

    Example:
        >>> video_to_tensor(np.zeros((5, 32, 32, 3), np.uint8)).shape     # [5, 3, 32, 32]
    """
    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "convert"):
        video = np.stack([np.asarray(im.convert("RGB")) for im in video])
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a numpy source video must be [F, H, W, C], got shape {video.shape}")
        scale = 255.0 if video.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / scale
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise ValueError(f"a tensor source video must be [F, C, H, W], got shape {tuple(video.shape)}")
        return video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
    raise ValueError(f"source video of type {type(video).__name__}: pass PIL frames, a [F, H, W, C] array or a [F, C, H, W] tensor")
