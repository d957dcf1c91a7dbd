"""LIVEditor's sampling recipe: the sampler's schedule, the input geometry, the defaults and their switches,
and the pipeline's latents step by step against a loop written here from the recipe."""

import math

import numpy as np
import pytest
import torch

from isa_plugin.pipelines.liveditor_pipeline import liveditor_scheduler
from isa_plugin.pipelines.liveditor_recipe import (
    ASPECT_BUCKETS, bucket_size, liveditor_sigmas, resample_fps, resize_to_bucket, set_liveditor_timesteps, trim_frames,
    video_to_tensor,
)


# ------------------------------------------------------------------------------------------ sampler
def test_schedule_pinned_at_32_steps_shift_6():
    sched = liveditor_scheduler()
    set_liveditor_timesteps(sched, 32)
    sigmas, timesteps = sched.sigmas.tolist(), sched.timesteps.tolist()
    assert len(timesteps) == 32 and len(sigmas) == 33 and sigmas[-1] == 0.0
    assert [round(s, 5) for s in sigmas[:2]] == [0.99983, 0.99448]
    assert round(sigmas[-3], 4) == 0.2855 and round(sigmas[-2], 5) == 0.16202
    assert timesteps[-3:] == [382, 285, 162] and timesteps[0] == 999
    assert sched.timesteps.dtype == torch.int64


def test_schedule_rule():
    base = liveditor_sigmas(32)
    assert base[0] == float(np.float32(0.999)) and len(base) == 32
    np.testing.assert_allclose(np.diff(base), -base[0] / 32, rtol=1e-12)
    sched = liveditor_scheduler()
    set_liveditor_timesteps(sched, 8)
    shifted = 6.0 * base[:1] / (1 + 5.0 * base[:1])
    assert sched.timesteps[0].item() == int(shifted[0] * 1000)
    with pytest.raises(ValueError, match="positive"):
        liveditor_sigmas(0)


# ------------------------------------------------------------------------------------------ input
@pytest.mark.parametrize("hw, bucket", [((1080, 1920), (544, 960)), ((1920, 1080), (960, 544)), ((500, 510), (720, 720)),
                                         ((300, 640), (480, 960)), ((640, 300), (960, 480)), ((480, 832), (544, 960))])
def test_bucket_choice(hw, bucket):
    assert bucket_size(*hw) == bucket
    assert {(h, w) for w, h in ASPECT_BUCKETS.values()} >= {bucket}


def test_resize_covers_then_center_crops():
    # a 2.22:1 source into the 2:1 bucket: resized to height 480 (width 1066 rounded up to 1072), cropped in the middle
    frames = torch.zeros(1, 1, 90, 200)
    frames[..., 95:105] = 1.0  # a bright vertical band at the centre
    out = resize_to_bucket(frames)
    assert out.shape == (1, 1, 480, 960)  # 200/90 = 2.22 -> the 2:1 bucket
    band = out[0, 0, 240].argmax().item()
    assert abs(band - 480) < 30  # the centre stays in the centre
    out = resize_to_bucket(torch.rand(2, 3, 40, 64), size=(32, 48))
    assert out.shape == (2, 3, 32, 48)


def test_fps_resampling_and_frame_cut():
    frames = torch.arange(60.0).view(60, 1, 1, 1)
    out = resample_fps(frames, fps=30)
    assert out.shape[0] == 32 and out[:4].flatten().tolist() == [0, 1, 3, 5]  # t = i / 16 -> frame floor(i * 30 / 16)
    assert resample_fps(frames, fps=None) is frames and resample_fps(frames, fps=16) is frames
    assert resample_fps(torch.arange(4.0).view(4, 1), fps=8).flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="fps"):
        resample_fps(frames, fps=0)
    assert trim_frames(frames).shape[0] == 57 and trim_frames(frames[:5]).shape[0] == 5 and trim_frames(frames[:4]).shape[0] == 1


def test_video_scaling():
    array = np.full((2, 4, 6, 3), 255, np.uint8)
    assert torch.equal(video_to_tensor(array), torch.ones(2, 3, 4, 6))
    assert torch.equal(video_to_tensor(array.astype(np.float32) / 255), torch.ones(2, 3, 4, 6))
    assert torch.equal(video_to_tensor(torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)), torch.ones(2, 3, 4, 6))
    with pytest.raises(ValueError, match="F, H, W, C"):
        video_to_tensor(np.zeros((4, 6, 3)))
