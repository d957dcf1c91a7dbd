"""ThresholdProfile: round trip, configs per layer, compatibility checks, construction (files: test_profile_io.py)."""

import os
import warnings

import pytest
import torch

from isa_plugin import ISAConfig
from isa_plugin.layer_setting import LayerSetting, ProfileError
from isa_plugin.profile import ThresholdProfile, config_hash


def _profile(per_head=True, buckets=False):
    a = LayerSetting(alpha_s=0.25, alpha_f=0.5, alpha_ns=0.0625, sharpness="l2", error_target=0.031, error_context=0.044, relative_cost=0.3)
    b = LayerSetting(alpha_s=(0.25, 1.0, 0.125), alpha_f=0.5, alpha_ns=(0.03125, 0.25, 0.0625), error_target=0.02,
                     error_context=0.05, relative_cost=0.41, error_target_per_head=(0.01, 0.0, 0.05),
                     error_context_per_head=(0.02, 0.0, 0.1)) if per_head else a
    d = LayerSetting(dense=True, error_target=0.0, error_context=0.0, relative_cost=1.0)
    layers = {"blocks.0.attn1": [a], "blocks.1.attn1": [b], "blocks.2.attn1": [d]}
    edges = ()
    if buckets:
        layers = {k: [v[0], a] for k, v in layers.items()}
        edges = (500.0,)
    return ThresholdProfile(layers=layers, budget={"metric": "rel_l1", "target": 0.05, "context": 0.1}, block_size=64,
                            timestep_edges=edges, calibrated_on={"transformer_class": "Linear", "config_hash": "abc",
                                                                 "resolution": [480, 832], "frames": 81, "steps": 30},
                            cost_model={"a": 1.0, "b": 1.0, "c": 0.0})


@pytest.mark.parametrize("per_head,buckets", [(False, False), (True, False), (True, True)])
def test_round_trip(tmp_path, per_head, buckets):
    prof = _profile(per_head, buckets)
    path = prof.save(tmp_path / "p.yaml")
    assert (tmp_path / "p.safetensors").exists() == per_head
    loaded = ThresholdProfile.load(path)
    assert loaded == prof
    assert loaded.layers == prof.layers
    assert loaded.setting("blocks.1.attn1", 900 if buckets else None).alpha_ns == prof.setting("blocks.1.attn1", 900 if buckets else None).alpha_ns
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_configs_for_and_uniform():
    prof = _profile()
    cfgs = prof.configs_for()
    assert cfgs["blocks.2.attn1"] is None
    assert cfgs["blocks.0.attn1"] == ISAConfig(alpha_s=0.25, alpha_f=0.5, alpha_ns=0.0625, sharpness="l2")
    assert cfgs["blocks.1.attn1"].alpha_s == (0.25, 1.0, 0.125)
    u = ThresholdProfile.uniform(["a", "b"], ISAConfig(block_size=32))
    assert u.block_size == 32 and u.config_for("a") == ISAConfig(block_size=32)
    bucketed = _profile(buckets=True)
    with pytest.raises(ValueError, match="timestep"):
        bucketed.configs_for()
    assert bucketed.bucket_of(100) == 0 and bucketed.bucket_of(600) == 1


# ------------------------------------------------------------------------------------------ corrupt files
# ------------------------------------------------------------------------------------------ compatibility
def test_check_compatible():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    prof = ThresholdProfile.uniform(["0"], ISAConfig(), calibrated_on={
        "transformer_class": "Sequential", "config_hash": config_hash(model), "resolution": [480, 832], "frames": 81})
    prof.check_compatible(model)
    prof.check_compatible(model, layer_names=["0"])
    with pytest.raises(ValueError, match="do not match"):
        prof.check_compatible(model, layer_names=["0", "1"])
    with pytest.raises(ValueError, match="Sequential"):
        prof.check_compatible(torch.nn.Linear(2, 2))
    other = ThresholdProfile.uniform(["0"], ISAConfig(), calibrated_on={"transformer_class": "Sequential", "config_hash": "0" * 16})
    with pytest.raises(ValueError, match="config hash"):
        other.check_compatible(model)
    missing = ThresholdProfile.uniform(["blocks.7.attn1"], ISAConfig())
    with pytest.raises(ValueError, match="does not have"):
        missing.check_compatible(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prof.check_compatible(model, height=720, width=1280, frames=81)
    assert any("resolution 720x1280" in str(x.message) for x in w)


def test_config_hash_ignores_private_keys():
    assert config_hash({"a": 1, "_name_or_path": "x"}) == config_hash({"a": 1, "_diffusers_version": "y"})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_invalid_construction():
    with pytest.raises(ProfileError, match="timestep bucket"):
        ThresholdProfile(layers={"a": [LayerSetting(), LayerSetting()]})
    with pytest.raises(ProfileError, match="different lengths"):
        LayerSetting(alpha_s=(0.5, 0.5), alpha_f=(0.5, 0.5, 0.5))
