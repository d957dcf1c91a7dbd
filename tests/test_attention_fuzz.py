"""Fuzzing the public constructors and the profile loader: junk gives the documented error types only.

- ``ThresholdProfile.load`` on mutated profiles (any value of the document replaced by junk of any type)
  and on random bytes: loads, or raises ``ProfileError`` — never ``KeyError``, ``AttributeError``,
  ``IndexError``, ``TypeError`` from deep inside.
- ``Layout`` and ``ISAConfig.from_dict`` on junk: construct, or raise ``ValueError`` / ``TypeError`` with
  a message naming the value.
"""

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isa_plugin import ISAConfig, Layout
from isa_plugin.layer_setting import LayerSetting, ProfileError
from isa_plugin.profile import ThresholdProfile

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["per_head", "topk_mass", "l2", "rel_l1", "", "blocks.0.attn1"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(doc, prefix=()):
    """Every (path to a value) of a nested dict/list document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    layers = {
        "blocks.0.attn1": [LayerSetting(alpha_s=(0.25, 0.5), alpha_f=0.5, alpha_ns=0.125, error_target=0.01, relative_cost=0.3),
                           LayerSetting(dense=True)],
        "blocks.1.attn1": [LayerSetting(alpha_s=0.5, alpha_f=(0.5, 0.75), alpha_ns=0.25, sharpness="l2"),
                           LayerSetting(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0)],
    }
    prof = ThresholdProfile(layers=layers, block_size=16, timestep_edges=(500.0,),
                            calibrated_on={"transformer_class": "WanTransformer3DModel", "resolution": [64, 64], "frames": 9,
                                           "tokens": {"target": 48, "context": 48, "text": 0}})
    path = prof.save(d / "profile.yaml")
    return path, yaml.safe_load(path.read_text()), path.with_suffix(".safetensors").read_bytes()


@SETTINGS
@given(data=st.data())
def test_mutated_profile_loads_or_raises_profile_error(saved, tmp_path_factory, data):
    path, doc, sidecar = saved
    paths = list(_paths(doc))
    mutated = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(mutated))
        mutated = _replace(mutated, data.draw(st.sampled_from(paths)), data.draw(junk))
    d = tmp_path_factory.mktemp("m")
    (d / "profile.safetensors").write_bytes(sidecar)
    try:
        text = yaml.safe_dump(mutated)
    except yaml.YAMLError:
        return
    (d / "profile.yaml").write_text(text)
    try:
        prof = ThresholdProfile.load(d / "profile.yaml")
    except ProfileError:
        return
    # whatever loaded is a usable profile: configs build, ratios in range
    for name in prof.layer_names:
        for b in range(prof.num_buckets):
            s = prof.layers[name][b]
            if not s.dense:
                for r in ("alpha_s", "alpha_f", "alpha_ns"):
                    vals = getattr(s, r) if isinstance(getattr(s, r), tuple) else (getattr(s, r),)
                    assert all(0 < x <= 1 and not math.isnan(x) for x in vals)
                s.to_config(prof.block_size)


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes_raise_profile_error(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("b") / "p.yaml"
    p.write_bytes(blob)
    with pytest.raises(ProfileError):
        ThresholdProfile.load(p)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text_raises_profile_error(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("t") / "p.yaml"
    p.write_text(text)
    with pytest.raises(ProfileError):
        ThresholdProfile.load(p)


@SETTINGS
@given(spans=st.lists(st.one_of(junk, st.tuples(st.sampled_from(["target", "context", "text", "ctx"]), junk),
                                st.tuples(st.sampled_from(["target", "context", "text"]), st.integers(-3, 50))), max_size=4))
def test_layout_from_junk(spans):
    try:
        layout = Layout(spans)
    except ValueError as e:
        assert str(e)
        return
    assert layout.num_tokens > 0 and layout.num("target") > 0
    assert layout.blocks(16).num_blocks == layout.num_blocks(16)


@SETTINGS
@given(d=st.dictionaries(st.sampled_from(["alpha_s", "alpha_f", "alpha_ns", "block_size", "sharpness", "topk_fraction",
                                          "backend", "share_plan", "unknown"]), junk, max_size=4))
def test_config_from_junk(d):
    try:
        cfg = ISAConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    assert ISAConfig.from_dict(cfg.to_dict()) == cfg
    cfg.per_head(cfg.num_heads or 2) if cfg.num_heads != -1 else None
    torch.tensor(0)  # nothing left half-initialised


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["transformer_class", "config_hash", "resolution", "frames", "tokens", "layer_names"]), value=junk)
def test_apply_with_junk_provenance(wan_kit, key, value):
    """Junk in ``calibrated_on``: apply_isa applies (and the run works) or raises ValueError / TypeError."""
    from isa_plugin import apply_isa, remove_isa
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = _model(wan_kit)
    on = {"transformer_class": "WanTransformer3DModel", "resolution": [64, 64], "frames": 9,
          "tokens": {"target": 128, "context": 128, "text": 0}}
    on[key] = value
    prof = ThresholdProfile.uniform(["blocks.0.attn1"], ISAConfig(block_size=16), calibrated_on=on)
    try:
        apply_isa(t, prof, layout=WanICLLayout(2))
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wan_kit.run(t, wan_kit.wan_inputs(frames=4, size=16))
    finally:
        remove_isa(t)


_MODEL = {}


def _model(wan_kit):
    if "t" not in _MODEL:
        _MODEL["t"] = wan_kit.wan(num_layers=1)
    return _MODEL["t"]
