"""Threshold profiles on disk: a YAML file (read with ``yaml.safe_load`` only) and a safetensors sidecar.

A layer entry lists its mode's profile fields (``SelectionMode.profile_fields``, plus the optional ones that
are set), ``mode`` when it is not the default mode, ``plan_reuse`` when it is not 1, and the measured errors
and cost; ``{dense: true}`` for a
dense layer. Per-head values appear in the YAML as the string ``"per_head"`` and live in the sidecar
(``profile.yaml`` -> ``profile.safetensors``), whose SHA-256 the YAML records. Writes are atomic (temporary
file + rename). Loading never executes code: a pickle or ``torch.save`` file is refused.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch

from .config import ISAConfig
from .layer_setting import LayerSetting, ProfileError
from .selection import DEFAULT_MODE, get_mode
from .validation import validate_budget

__all__ = ["SCHEMA_VERSION", "profile_to_doc", "save_profile", "load_profile", "sidecar_path", "plain", "check_budget"]

SCHEMA_VERSION = 1
_KIND = "isa-threshold-profile"
_PER_HEAD = "per_head"
_MEASURED = ("error_target", "error_context", "relative_cost")
_MEASURED_PER_HEAD = ("error_target_per_head", "error_context_per_head")
_METRICS = ("rel_l1",)


def plain(v: Any) -> Any:
    """``v`` as plain YAML/JSON data (mappings, lists, str, int, float, bool, None)."""
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if v is None or type(v) in (str, int, float, bool):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)


def _entry(name: str, b: int, s: LayerSetting, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """One layer entry of the YAML (per-head values into ``tensors``)."""
    e: Dict[str, Any] = {}
    if s.dense:
        e["dense"] = True
    else:
        mode = s.config.selection
        values = mode.to_dict(s.config.settings)
        defaults = mode.defaults()
        carried = mode.profile_fields + mode.optional_profile_fields
        dropped = [k for k in values if k not in carried and values[k] != plain(defaults[k])]
        if dropped:
            raise ProfileError(f"layer {name!r}: profiles do not carry the {mode.name} mode's {dropped}; leave them at "
                               f"{[defaults[k] for k in dropped]}")
        if s.mode != DEFAULT_MODE:
            e["mode"] = s.mode
        for k in carried:
            v = getattr(s.config.settings, k)
            if isinstance(v, tuple):
                tensors[f"{name}/{b}/{k}"] = torch.tensor(v, dtype=torch.float64)
                e[k] = _PER_HEAD
            elif v is not None or k in mode.profile_fields:
                e[k] = v
        if s.config.plan_reuse != 1:
            e["plan_reuse"] = s.config.plan_reuse
    for k in _MEASURED:
        if getattr(s, k) is not None:
            e[k] = getattr(s, k)
    for k in _MEASURED_PER_HEAD:
        if getattr(s, k) is not None:
            tensors[f"{name}/{b}/{k}"] = torch.tensor(getattr(s, k), dtype=torch.float64)
            e[k] = _PER_HEAD
    return e


def profile_to_doc(profile) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The YAML document and the sidecar tensors (per-head values) of a :class:`~isa_plugin.profile.ThresholdProfile`.

    Raises:
        ProfileError: a setting a profile cannot carry (a mode setting outside its profile fields).
    """
    tensors: Dict[str, torch.Tensor] = {}
    layers_out: Dict[str, Any] = {}
    for name, settings in profile.layers.items():
        entries = [_entry(name, b, s, tensors) for b, s in enumerate(settings)]
        layers_out[name] = entries[0] if len(entries) == 1 else {"buckets": entries}
    doc = {
        "schema_version": profile.schema_version,
        "kind": _KIND,
        "budget": plain(profile.budget),
        "block_size": profile.block_size,
        "timestep_edges": list(profile.timestep_edges),
        "calibrated_on": plain(profile.calibrated_on),
        "cost_model": plain(profile.cost_model),
        "num_layers": len(layers_out),  # written before the layers: a truncated file is detected on load
        "layers": layers_out,
    }
    return doc, tensors


def save_profile(profile, path: Union[str, os.PathLike]) -> Path:
    """Write the YAML (and the safetensors sidecar when any value is per head) atomically; returns the YAML path."""
    import yaml
    from safetensors.torch import save as st_save

    path = Path(path)
    doc, tensors = profile_to_doc(profile)
    sidecar = sidecar_path(path)
    if tensors:
        blob = st_save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"schema_version": str(SCHEMA_VERSION)})
        doc["sidecar"] = {"file": sidecar.name, "sha256": hashlib.sha256(blob).hexdigest()}
        _atomic_write(sidecar, blob)
    text = "# ISA threshold profile (isa-plugin). Read with yaml.safe_load; see `isa inspect`.\n"
    text += yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    _atomic_write(path, text.encode())
    return path


def load_profile(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read and validate a profile file; returns the keyword arguments of ``ThresholdProfile``.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder (the message suggests the profile file inside it).
        ProfileError (a ``ValueError``): truncated or corrupt YAML or sidecar, unknown schema version,
            wrong types, or out-of-range values; the message names the file and the field.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"ISA profile {str(path)!r} is a directory; give the profile's YAML file "
                                f"(e.g. {str(path / 'profile.yaml')!r})")
    if not path.is_file():
        raise FileNotFoundError(f"ISA profile {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not a text YAML file ({e.reason}); the file is corrupt") from None
    except yaml.YAMLError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProfileError(f"{path}: corrupt or truncated YAML ({msg}); only plain YAML is accepted") from None
    if not isinstance(doc, dict):
        raise ProfileError(f"{path}: expected a YAML mapping at the top level, got {type(doc).__name__} (truncated or not a profile)")
    if doc.get("kind") not in (None, _KIND):
        raise ProfileError(f"{path}: kind={doc.get('kind')!r} is not an ISA threshold profile")
    ver = doc.get("schema_version")
    if ver is None:
        raise ProfileError(f"{path}: missing 'schema_version' (truncated or not an ISA profile)")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver != SCHEMA_VERSION:
        raise ProfileError(
            f"{path}: schema_version={ver!r} is not supported by this isa-plugin (supported: {SCHEMA_VERSION}); "
            "upgrade isa-plugin or recalibrate"
        )
    for key in ("layers", "budget"):
        if key not in doc:
            raise ProfileError(f"{path}: missing {key!r} (truncated file?)")
    n_layers = doc.get("num_layers")
    if n_layers is not None and (not isinstance(doc["layers"], dict) or len(doc["layers"]) != n_layers):
        got = len(doc["layers"]) if isinstance(doc["layers"], dict) else 0
        raise ProfileError(f"{path}: lists {got} layer(s) but records num_layers={n_layers!r} (truncated file?); save it again")
    tensors = _load_sidecar(path, doc.get("sidecar"))
    try:
        return _from_doc(doc, tensors)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None


def _setting(name: str, b: int, e: Any, tensors: Dict[str, torch.Tensor], used: set, block_size: int) -> LayerSetting:
    if not isinstance(e, dict):
        raise ProfileError(f"layer {name!r}: settings must be a mapping, got {type(e).__name__}")
    mode_name = e.get("mode", DEFAULT_MODE)
    try:
        mode = get_mode(mode_name)
    except ValueError as err:
        raise ProfileError(f"layer {name!r}: {err}") from None
    fields = mode.profile_fields + mode.optional_profile_fields
    known = {"dense", "mode", "plan_reuse", *_MEASURED, *_MEASURED_PER_HEAD, *fields, *mode.legacy_profile_fields}
    unknown = sorted(set(e) - known)
    if unknown:
        raise ProfileError(f"layer {name!r}: unknown keys {unknown}; known: {sorted(known)}")
    kw = {}
    for k, v in e.items():
        if k in mode.legacy_profile_fields:
            continue
        if v == _PER_HEAD:
            key = f"{name}/{b}/{k}"
            if key not in tensors:
                raise ProfileError(f"layer {name!r}: {k} is per head but the sidecar has no {key!r}")
            t = tensors[key]
            if t.ndim != 1 or t.numel() == 0:
                raise ProfileError(f"layer {name!r}: sidecar {key!r} has shape {tuple(t.shape)}; expected [heads]")
            used.add(key)
            v = tuple(float(x) for x in t.tolist())
        kw[k] = v
    if kw.pop("dense", False):
        return LayerSetting(dense=True, **{k: kw[k] for k in (*_MEASURED, *_MEASURED_PER_HEAD) if k in kw})
    kw.pop("mode", None)
    measured = {k: kw.pop(k) for k in (*_MEASURED, *_MEASURED_PER_HEAD) if k in kw}
    try:
        config = ISAConfig(mode_name, block_size=block_size, **kw)
    except (TypeError, ValueError) as err:
        raise ProfileError(str(err).replace("ISAConfig.", "")) from None
    return LayerSetting(config, **measured)


def _from_doc(doc: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    layers_doc = doc["layers"]
    if not isinstance(layers_doc, dict) or not layers_doc:
        raise ProfileError("'layers' must be a non-empty mapping of layer name to settings")
    edges = doc.get("timestep_edges") or []
    if not isinstance(edges, list) or not all(isinstance(e, numbers.Real) and not isinstance(e, bool) for e in edges):
        raise ProfileError(f"timestep_edges={edges!r} must be a list of numbers")
    n_buckets = len(edges) + 1
    block_size = doc.get("block_size", 64)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ProfileError(f"block_size={block_size!r} must be a positive integer")
    used: set = set()
    layers: Dict[str, List[LayerSetting]] = {}
    for name, entry in layers_doc.items():
        if not isinstance(name, str):
            raise ProfileError(f"layer name {name!r} must be a string")
        if isinstance(entry, dict) and "buckets" in entry:
            entries = entry["buckets"]
            if not isinstance(entries, list):
                raise ProfileError(f"layer {name!r}: 'buckets' must be a list")
        else:
            entries = [entry]
        if len(entries) != n_buckets:
            raise ProfileError(f"layer {name!r} has {len(entries)} bucket setting(s); the profile has {n_buckets}")
        settings = []
        for b, e in enumerate(entries):
            try:
                settings.append(_setting(name, b, e, tensors, used, block_size))
            except ProfileError as err:
                msg = str(err)
                raise ProfileError(msg if msg.startswith(f"layer {name!r}") else f"layer {name!r}: {msg}") from None
        layers[name] = settings
    cal = doc.get("calibrated_on") or {}
    if not isinstance(cal, dict):
        raise ProfileError(f"calibrated_on must be a mapping, got {type(cal).__name__}")
    cm = doc.get("cost_model") or {}
    if not isinstance(cm, dict):
        raise ProfileError(f"cost_model must be a mapping, got {type(cm).__name__}")
    return dict(layers=layers, budget=doc["budget"], block_size=block_size, timestep_edges=tuple(edges),
                calibrated_on=cal, cost_model=cm)


def check_budget(budget: Any) -> None:
    """Raise :class:`ProfileError` unless ``budget`` is ``{metric: rel_l1, target: t, context: c}`` with t, c in (0, 1)."""
    if not isinstance(budget, dict):
        raise ProfileError(f"budget must be a mapping like {{metric: rel_l1, target: 0.05, context: 0.05}}, got {budget!r}")
    metric = budget.get("metric", "rel_l1")
    if metric not in _METRICS:
        raise ProfileError(f"budget metric {metric!r} is not supported; supported: {list(_METRICS)}")
    for k in ("target", "context"):
        v = budget.get(k)
        if v is None:
            raise ProfileError(f"budget.{k} is missing")
        try:
            validate_budget(v, name=f"budget.{k}")
        except ValueError as e:
            raise ProfileError(str(e)) from None


def sidecar_path(path: Union[str, os.PathLike]) -> Path:
    """Where :meth:`ThresholdProfile.save` writes the per-head sidecar of the profile at ``path``
    (``profile.yaml`` -> ``profile.safetensors``)."""
    path = Path(path)
    return path.with_suffix(".safetensors") if path.suffix else path.with_name(path.name + ".safetensors")


def _load_sidecar(path: Path, meta: Any) -> Dict[str, torch.Tensor]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not isinstance(meta.get("file"), str) or not isinstance(meta.get("sha256"), str):
        raise ProfileError(f"{path}: 'sidecar' must be {{file: <name>, sha256: <hex>}}, got {meta!r}")
    name = meta["file"]
    if Path(name).name != name:
        raise ProfileError(f"{path}: sidecar file {name!r} must be a plain file name next to the profile")
    side = path.parent / name
    if not side.is_file():
        raise ProfileError(f"{path}: its per-head sidecar {str(side)!r} is missing; copy it next to the profile")
    blob = side.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ProfileError(f"{side}: sidecar checksum does not match the profile (truncated, corrupt or from another profile)")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise ProfileError(f"{side}: corrupt safetensors sidecar ({e})") from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ProfileError(f"{side}: sidecar tensor {k!r} has dtype {t.dtype}; expected floats")
    return tensors


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, with an ordinary file's mode.

    The mode is the existing file's, else ``0o666`` less the umask (``mkstemp`` alone would leave 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask
