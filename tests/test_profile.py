"""ThresholdProfile: round trip, every corrupt-file case, hostile YAML, compatibility checks, atomic save."""

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
def _saved(tmp_path, **kw):
    return _profile(**kw).save(tmp_path / "p.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ThresholdProfile.load(tmp_path / "nope.yaml")


def test_truncated_yaml(tmp_path):
    p = _saved(tmp_path)
    text = p.read_text()
    for cut in (len(text) // 3, len(text) // 2, 40):
        p.write_text(text[:cut])
        with pytest.raises(ProfileError, match="truncated|corrupt|missing"):
            ThresholdProfile.load(p)


def test_corrupt_yaml(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ProfileError, match="corrupt"):
        ThresholdProfile.load(p)
    p.write_text("schema_version: 1\nlayers: {a: [1, 2\n")
    with pytest.raises(ProfileError, match="corrupt or truncated YAML"):
        ThresholdProfile.load(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match="mapping"):
        ThresholdProfile.load(p)


def test_missing_truncated_and_corrupt_sidecar(tmp_path):
    p = _saved(tmp_path)
    side = tmp_path / "p.safetensors"
    blob = side.read_bytes()
    side.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ProfileError, match="sidecar checksum"):
        ThresholdProfile.load(p)
    flipped = bytearray(blob)
    flipped[-3] ^= 0xFF
    side.write_bytes(bytes(flipped))
    with pytest.raises(ProfileError, match="sidecar checksum"):
        ThresholdProfile.load(p)
    # a corrupt sidecar whose checksum was (wrongly) updated still fails to parse
    import hashlib

    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    side.write_bytes(garbage)
    p.write_text(p.read_text().replace(hashlib.sha256(blob).hexdigest(), hashlib.sha256(garbage).hexdigest()))
    with pytest.raises(ProfileError, match="corrupt safetensors sidecar"):
        ThresholdProfile.load(p)
    side.unlink()
    with pytest.raises(ProfileError, match="sidecar .* is missing"):
        ThresholdProfile.load(p)


def test_unknown_schema_version(tmp_path):
    p = _saved(tmp_path, per_head=False)
    p.write_text(p.read_text().replace("schema_version: 1", "schema_version: 99"))
    with pytest.raises(ProfileError, match="schema_version=99 is not supported"):
        ThresholdProfile.load(p)
    p.write_text(p.read_text().replace("schema_version: 99", "schema_version: one"))
    with pytest.raises(ProfileError, match="schema_version"):
        ThresholdProfile.load(p)


@pytest.mark.parametrize("old,new,match", [
    ("alpha_s: 0.25", "alpha_s: 1.5", "out of range"),
    ("alpha_s: 0.25", "alpha_s: 0.0", "out of range"),
    ("alpha_s: 0.25", "alpha_s: -0.1", "out of range"),
    ("alpha_s: 0.25", "alpha_s: .nan", "out of range"),
    ("alpha_s: 0.25", "alpha_s: quarter", "must be a number"),
    ("alpha_s: 0.25", "alpha_s: true", "must be a number"),
    ("alpha_s: 0.25", "alpha_s: []", "empty"),
    ("sharpness: l2", "sharpness: entropy", "sharpness"),
    ("error_target: 0.031", "error_target: -1", "non-negative"),
    ("block_size: 64", "block_size: sixty", "block_size"),
    ("target: 0.05", "target: lots", "budget"),
    ("metric: rel_l1", "metric: psnr", "metric"),
    ("alpha_s: 0.25", "alpha_z: 0.25", "unknown keys"),
])
def test_wrong_types_and_ranges(tmp_path, old, new, match):
    p = _saved(tmp_path, per_head=False)
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(ProfileError, match=match):
        ThresholdProfile.load(p)


def test_per_head_values_out_of_range_in_sidecar(tmp_path):
    prof = _profile()
    doc, tensors = prof.to_yaml_dict()
    bad = ThresholdProfile(layers={"x": [LayerSetting(alpha_s=(0.5, 1.0))]})
    p = bad.save(tmp_path / "p.yaml")
    from safetensors.torch import save_file

    import hashlib

    save_file({"x/0/alpha_s": torch.tensor([0.5, 2.0], dtype=torch.float64)}, str(tmp_path / "p.safetensors"))
    blob = (tmp_path / "p.safetensors").read_bytes()
    import re

    p.write_text(re.sub(r"sha256: [0-9a-f]+", f"sha256: {hashlib.sha256(blob).hexdigest()}", p.read_text()))
    with pytest.raises(ProfileError, match=r"alpha_s\[1\]=2.0 is out of range"):
        ThresholdProfile.load(p)


def test_hostile_yaml_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(
        "schema_version: 1\n"
        f"budget: !!python/object/apply:os.system ['touch {marker}']\n"
        "layers: {a: {alpha_s: 0.5}}\n"
    )
    with pytest.raises(ProfileError, match="corrupt or truncated YAML"):
        ThresholdProfile.load(p)
    p.write_text(f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]\n")
    with pytest.raises(ProfileError):
        ThresholdProfile.load(p)
    assert not marker.exists()


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


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = _saved(tmp_path, per_head=False)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        _profile(per_head=False, buckets=True).save(p)
    assert p.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_invalid_construction():
    with pytest.raises(ProfileError, match="timestep bucket"):
        ThresholdProfile(layers={"a": [LayerSetting(), LayerSetting()]})
    with pytest.raises(ProfileError, match="different lengths"):
        LayerSetting(alpha_s=(0.5, 0.5), alpha_f=(0.5, 0.5, 0.5))
