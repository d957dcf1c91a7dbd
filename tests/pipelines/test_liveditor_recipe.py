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
