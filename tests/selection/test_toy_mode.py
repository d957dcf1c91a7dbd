"""A selection mode defined in this file alone goes through calibrate -> fit -> save -> load -> apply -> run.

The toy mode keeps, per query block, its top-k key blocks by pooled logit (text blocks always exact) and
every other key block as a block-mean pseudo-key. Nothing in the package knows it: it registers itself, and
``ISAConfig``, the calibration (generic plan measurement and fit), profiles and the processors ask it.
"""

from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

from isa_plugin import ISAConfig, Layout, ThresholdProfile, apply_isa, isa_attention, remove_isa, stats
from isa_plugin.calibration.recorder import calibrate
from isa_plugin.calibration.statistics import Grid
from isa_plugin.calibration.video import read_video, sample_video_path
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference
from isa_plugin.layout import TEXT
from isa_plugin.plan import BlockPlan
from isa_plugin.pipelines.tiny import PRESETS, build_tiny_wan_icl_pipeline
from isa_plugin.selection import SelectionMode, register_mode, unregister_mode



@dataclass(frozen=True)
class TopKSettings:
    k: int = 2

    def __post_init__(self):
        k = self.k
        if isinstance(k, float) and k.is_integer():  # profiles store numbers as floats
            object.__setattr__(self, "k", int(k))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={k!r} must be a positive integer")


@dataclass(frozen=True)
class TopKGrid:
    k: Tuple[int, ...] = (1, 2, 4)

    def candidates(self):
        for k in self.k:
            yield {"k": k}


EXACT_K = 1 << 20  # more key blocks than any call has: every block exact


class TopKMode(SelectionMode):
    name = "topk"
    settings_type = TopKSettings
    spec = "tests/selection/test_toy_mode.py"
    profile_fields = ("k",)
    grid_type = TopKGrid

    def is_dense(self, settings):
        return settings.k >= EXACT_K

    def exact_settings(self):
        return {"k": EXACT_K}

    def plan(self, qbar, kbar, blocks, settings, scale):
        B, H, nb, _ = qbar.shape
        blocks = blocks.to(qbar.device)
        is_x = blocks.kinds == TEXT
        logits = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale
        top = logits.masked_fill(is_x, float("-inf")).topk(min(settings.k, int((~is_x).sum())), dim=-1).indices
        exact = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=qbar.device).scatter_(-1, top, True) | is_x
        exact = exact | is_x[:, None]  # text query blocks attend exactly to everything
        keep = torch.ones(B, H, nb, dtype=torch.bool, device=qbar.device)
        return BlockPlan.from_masks(blocks, keep, exact, blocks.block_size)


@pytest.fixture
def topk_mode():
    register_mode(TopKMode())
    yield
    unregister_mode("topk")


def test_toy_mode_plans_and_runs_through_isa_attention(topk_mode):
    g = torch.Generator().manual_seed(0)
    layout = Layout([("target", 96), ("context", 64), ("text", 8)])
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 16, generator=g) for _ in range(3))
    cfg = ISAConfig(mode="topk", k=2, block_size=16)
    out, plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    assert plan.exact_counts()[0, 0, 0] == 2 + 1  # two non-text blocks plus the text block
    assert torch.equal(isa_attention(q, k, v, layout, cfg), out)
    every = ISAConfig(mode="topk", k=EXACT_K, block_size=16)
    assert every.is_dense
    torch.testing.assert_close(isa_attention_reference(q, k, v, layout, every), dense_attention_reference(q, k, v))
    with pytest.raises(ValueError, match="must be a positive integer"):
        ISAConfig(mode="topk", k=0)
    with pytest.raises(ValueError, match="not settings of mode 'topk'"):
        ISAConfig(mode="topk", alpha_f=0.5)


@pytest.mark.slow
def test_toy_mode_calibrate_fit_save_load_apply_run(topk_mode, tmp_path):
    p = PRESETS["tiny"]
    pipe = build_tiny_wan_icl_pipeline(p)
    video = read_video(sample_video_path(), height=p.height, width=p.width, frames=p.frames)
    profile, st = calibrate(pipe, [video, video.flip(0)], "make it winter", budget=0.3, steps=2, height=p.height, width=p.width,
                            frames=p.frames, block_size=p.block_size, grid=Grid(modes=["topk"], k=(1, 2, 4)), progress=False)
    assert list(st.grid.modes) == ["topk"]
    modes = {s.mode for ss in profile.layers.values() for s in ss}
    assert modes == {"topk"}, modes
    path = profile.save(tmp_path / "profile.yaml")
    assert "mode: topk" in path.read_text()
    loaded = ThresholdProfile.load(path)
    assert loaded == profile
    apply_isa(pipe, loaded)
    frames = pipe(prompt="make it winter", video=video, height=p.height, width=p.width, num_frames=p.frames,
                  num_inference_steps=2, output_type="latent").frames
    assert torch.isfinite(frames).all()
    counts = stats(pipe)
    assert all(c["isa_calls"] > 0 and c["backends"] == {"reference": c["isa_calls"]} for c in counts.values()), counts
    remove_isa(pipe)
