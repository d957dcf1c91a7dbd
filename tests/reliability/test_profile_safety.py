"""Threshold profiles are data only: loading one never executes code.

The YAML is read with ``yaml.safe_load`` (no Python tags), the per-head sidecar with safetensors (no
pickle); hostile files are refused with a :class:`ProfileError` and leave no trace of execution.
"""

import ast
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from isa_plugin.layer_setting import LayerSetting, ProfileError
from isa_plugin.profile import ThresholdProfile

PKG = Path(__file__).resolve().parents[2] / "isa_plugin"


class _Boom:
    """Unpickling this creates the marker file (what a malicious pickle would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _profile(tmp_path, per_head=True):
    s = LayerSetting(alpha_s=(0.25, 0.5) if per_head else 0.25, alpha_f=0.5, alpha_ns=0.125)
    prof = ThresholdProfile(layers={"blocks.0.attn1": [s]}, block_size=8, calibrated_on={"transformer_class": "WanTransformer3DModel"})
    return prof.save(tmp_path / "profile.yaml")


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]",
        "!!python/object/new:pathlib.Path ['{marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
    ],
)
@pytest.mark.parametrize("where", ["top", "layer", "calibrated_on"])
def test_python_tags_in_yaml_are_refused(tmp_path, payload, where):
    marker = tmp_path / "executed"
    path = _profile(tmp_path, per_head=False)
    text = path.read_text()
    value = payload.format(marker=marker)
    if where == "top":
        text = f"evil: {value}\n" + text
    elif where == "layer":
        text = text.replace("alpha_f: 0.5", f"alpha_f: {value}")
    else:
        text = text.replace("transformer_class: WanTransformer3DModel", f"transformer_class: {value}")
    assert value in text
    path.write_text(text)
    with pytest.raises(ProfileError, match=r"corrupt or truncated YAML .*only plain YAML is accepted"):
        ThresholdProfile.load(path)
    assert not marker.exists()


def _replace_sidecar(path, blob):
    """Put ``blob`` in place of the sidecar and make the YAML's checksum match it (a consistent forgery)."""
    side = path.with_suffix(".safetensors")
    side.write_bytes(blob)
    doc = yaml.safe_load(path.read_text())
    doc["sidecar"]["sha256"] = hashlib.sha256(blob).hexdigest()
    path.write_text(yaml.safe_dump(doc))


def test_pickle_sidecar_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = _profile(tmp_path)
    blob = pickle.dumps({"blocks.0.attn1/0/alpha_s": _Boom(marker)})
    assert pickle.loads(blob) is not None and marker.exists()  # the payload does run when unpickled
    marker.unlink()
    _replace_sidecar(path, blob)
    with pytest.raises(ProfileError, match="corrupt safetensors sidecar"):
        ThresholdProfile.load(path)
    assert not marker.exists()


def test_torch_save_sidecar_is_refused(tmp_path):
    """A ``torch.save`` zip (pickle inside) named .safetensors."""
    import io

    marker = tmp_path / "executed"
    path = _profile(tmp_path)
    buf = io.BytesIO()
    torch.save({"blocks.0.attn1/0/alpha_s": _Boom(marker)}, buf)
    _replace_sidecar(path, buf.getvalue())
    with pytest.raises(ProfileError, match="corrupt safetensors sidecar"):
        ThresholdProfile.load(path)
    assert not marker.exists()


def test_sidecar_with_absurd_header_is_refused(tmp_path):
    path = _profile(tmp_path)
    blob = (2**62).to_bytes(8, "little") + b"{}"
    _replace_sidecar(path, blob)
    with pytest.raises(ProfileError, match="corrupt safetensors sidecar"):
        ThresholdProfile.load(path)


def test_sidecar_with_integer_tensors_is_refused(tmp_path):
    from safetensors.torch import save

    path = _profile(tmp_path)
    _replace_sidecar(path, save({"blocks.0.attn1/0/alpha_s": torch.tensor([1, 1])}))
    with pytest.raises(ProfileError, match="expected floats"):
        ThresholdProfile.load(path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors"])
def test_sidecar_outside_the_profile_folder_is_refused(tmp_path, name):
    path = _profile(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["sidecar"]["file"] = name
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match="must be a plain file name next to the profile"):
        ThresholdProfile.load(path)


def test_yaml_alias_bomb_loads_quickly_or_is_refused(tmp_path):
    """Nested aliases ('billion laughs') in the provenance do not expand during load."""
    import time

    path = _profile(tmp_path, per_head=False)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    path.write_text("bomb:\n" + "".join("  " + line + "\n" for line in bomb.splitlines()) + path.read_text())
    assert "*h" in path.read_text()
    t0 = time.perf_counter()
    try:
        ThresholdProfile.load(path)
    except ProfileError:
        pass
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------ no code-executing loader in the package
_FORBIDDEN_CALLS = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                    ("yaml", "full_load"), ("marshal", "loads"), ("dill", "load"), ("dill", "loads")}


def _weights_only(call: ast.Call) -> bool:
    """``torch.load(..., weights_only=True)``: torch's restricted unpickler, which runs no code."""
    return any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True for kw in call.keywords)


def test_package_has_no_code_executing_loaders():
    """No pickle / unsafe torch.load / unsafe YAML / eval / exec anywhere in isa_plugin (profiles and cost
    models are YAML, JSON and safetensors; the one checkpoint reader uses ``torch.load(weights_only=True)``)."""
    offenders = []
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offenders += [f"{f.name}:{node.lineno} import {a.name}" for a in node.names if a.name in ("dill", "marshal", "shelve")]
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
                    offenders.append(f"{f.name}:{node.lineno} {fn.id}()")
                if (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and (fn.value.id, fn.attr) in _FORBIDDEN_CALLS
                        and not ((fn.value.id, fn.attr) == ("torch", "load") and _weights_only(node))):
                    offenders.append(f"{f.name}:{node.lineno} {fn.value.id}.{fn.attr}()")
    assert not offenders, offenders
