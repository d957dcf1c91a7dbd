"""One timestep policy: calibration and inference put the same call in the same timestep bucket."""

from types import SimpleNamespace

import pytest
import torch

from isa_plugin import Layout
from isa_plugin.calibration.recorder import StatsObserver
from isa_plugin.calibration.statistics import CalibrationStats, Grid
from isa_plugin.layer_setting import LayerSetting
from isa_plugin.profile import ThresholdProfile
from isa_plugin.timesteps import bucket_edges, bucket_index, timestep_scalar

EDGES = (300.0, 700.0)
S = 6  # tokens per batch entry of the per-token timestep tensors


def _per_token(*entries):
    """[B, S] per-token timesteps: clean context tokens at 0, the rest of each entry at its value."""
    ts = torch.zeros(len(entries), S)
    for b, t in enumerate(entries):
        ts[b, S // 2:] = t
    return ts


CALLS = [
    pytest.param(800, id="python-number"),
    pytest.param(torch.tensor(100.0), id="0-d"),
    pytest.param(torch.tensor([500.0]), id="[B]"),
    pytest.param(torch.tensor([900.0, 900.0]), id="[B]-cfg"),
    pytest.param(torch.tensor([650.0, 710.0]), id="[B]-cfg-entries-differ"),
    pytest.param(_per_token(750.0), id="[B,S]-per-token"),
    pytest.param(_per_token(450.0, 450.0), id="[B,S]-per-token-cfg"),
    pytest.param(_per_token(250.0, 720.0), id="[B,S]-per-token-entries-differ"),
    pytest.param(torch.tensor([[0.0, 0.0, 300.0]], dtype=torch.float64), id="on-an-edge"),
]


def _calibration_bucket(ts) -> int:
    """The bucket calibration files a call under: recorder observer -> CalibrationStats.observe."""
    B = ts.shape[0] if isinstance(ts, torch.Tensor) and ts.ndim else 1
    stats = CalibrationStats(Grid(alpha_s=(0.5, 1.0), alpha_f=(1.0,), alpha_ns=(0.5,)), block_size=16,
                             timestep_edges=EDGES, blocks_per_kind=1, tokens_per_block=2)
    q, k, v = (torch.randn(B, 32, 1, 8) for _ in range(3))
    observer = StatsObserver(stats)
    observer("blocks.0.attn1", q, k, v, Layout([("target", 16), ("context", 16)]),
             SimpleNamespace(timestep=ts, call_index=0))
    filed = [b for b in range(stats.num_buckets) if stats.get("blocks.0.attn1", b) is not None]
    assert len(filed) == 1 and stats.get("blocks.0.attn1", filed[0]).calls == B
    return filed[0]


@pytest.mark.parametrize("ts", CALLS)
def test_calibration_and_inference_pick_the_same_bucket(ts):
    profile = ThresholdProfile(layers={"blocks.0.attn1": [LayerSetting(dense=True)] * 3}, timestep_edges=EDGES)
    expected = sum(1 for e in EDGES if timestep_scalar(ts) >= e)
    assert profile.bucket_of(ts) == expected
    assert _calibration_bucket(ts) == expected


def test_per_token_timestep_is_the_largest_value_not_the_first_token():
    ts = _per_token(750.0, 750.0)
    assert float(ts.flatten()[0]) == 0.0
    assert timestep_scalar(ts) == 750.0 and bucket_index(ts, EDGES) == 2
    assert timestep_scalar(_per_token(250.0, 720.0)) == 720.0  # every batch entry counts, not the first


def test_timestep_scalar():
    assert timestep_scalar(None) is None
    assert timestep_scalar(torch.empty(0)) is None
    assert timestep_scalar(3) == 3.0 and isinstance(timestep_scalar(3), float)
    assert timestep_scalar([[1, 9], [4, 2]]) == 9.0
    assert timestep_scalar(torch.tensor([5, 7], dtype=torch.int64)) == 7.0
    for bad in (True, "500", torch.tensor([True])):
        with pytest.raises(TypeError, match="timestep"):
            timestep_scalar(bad)


def test_bucket_edges():
    assert bucket_edges([999.0, 750.0, 500.0, 250.0], 2) == (625.0,)
    assert bucket_edges([250.0, 999.0, 500.0, 750.0, 750.0], 4) == (375.0, 625.0, 874.5)
    assert bucket_edges([900.0, 100.0], 5) == (500.0,)  # no more buckets than distinct timesteps
    assert bucket_edges([900.0, 100.0], 1) == () and bucket_edges([], 3) == ()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="buckets"):
            bucket_edges([1.0, 2.0], bad)


def test_bucket_index():
    assert bucket_index(None, ()) == 0 and bucket_index(123.0, []) == 0
    assert [bucket_index(t, EDGES) for t in (0, 299.9, 300, 699, 700, 1000)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="timestep"):
        bucket_index(None, EDGES)
    with pytest.raises(ValueError, match="timestep"):
        CalibrationStats(timestep_edges=EDGES).bucket_of(None)


@pytest.mark.parametrize("ts", CALLS)
def test_inference_hook_picks_the_calibration_bucket(ts):
    """The bucket apply_isa's pre-hook switches the processors to is the one calibration filed the call under."""
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from isa_plugin import apply_isa, remove_isa
    from isa_plugin.adapters import isa_processors

    torch.manual_seed(0)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    settings = [LayerSetting(alpha_s=a, alpha_f=1.0, alpha_ns=1.0) for a in (0.25, 0.5, 0.75)]
    profile = ThresholdProfile(layers={"blocks.0.attn1": settings}, timestep_edges=EDGES, block_size=16)
    apply_isa(t, profile)
    state = t._isa_state
    state.pre_hook(t, (), {"hidden_states": torch.zeros(1, 4, 2, 4, 4), "timestep": ts, "encoder_hidden_states": None})
    chosen = isa_processors(t)["blocks.0.attn1"].config.alpha_s
    remove_isa(t)
    assert chosen == settings[_calibration_bucket(ts)].alpha_s
