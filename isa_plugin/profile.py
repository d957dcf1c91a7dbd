"""Threshold profiles: per-layer ISA ratios measured on a user's own model and videos.

A :class:`ThresholdProfile` is what :func:`isa_plugin.calibration.fit_profile` writes and what
``apply_isa`` reads. It holds, per attention layer (exact module name, e.g. ``"blocks.0.attn1"``):

- the ratios (α_s, α_f, α_ns) and the sharpness metric, scalars or one value per head, optionally one
  setting per timestep bucket;
- or ``dense: true`` when no setting met the error budget;
- the measured error (relative L1 of the attention output against dense, separately for target-query and
  context-query outputs) and the predicted cost relative to dense attention;

plus the error budget and what the profile was calibrated on (transformer class, a hash of its config,
layer names, resolution, frames, steps, number of samples, library versions).

On disk a profile is a YAML file (read with ``yaml.safe_load`` only) and, when any value is per head,
a safetensors sidecar next to it (``profile.yaml`` -> ``profile.safetensors``) whose SHA-256 is recorded
in the YAML. Per-head values appear in the YAML as the string ``"per_head"``. ``save`` writes both
files atomically (temporary file + rename).

Example YAML::

    schema_version: 1
    kind: isa-threshold-profile
    budget: {metric: rel_l1, target: 0.05, context: 0.05}
    block_size: 64
    timestep_edges: []
    calibrated_on: {transformer_class: WanTransformer3DModel, config_hash: 3f2a..., ...}
    layers:
      blocks.0.attn1: {alpha_s: 0.25, alpha_f: 0.5, alpha_ns: 0.0625, sharpness: topk_mass,
                       error_target: 0.031, error_context: 0.044, relative_cost: 0.31}
      blocks.1.attn1: {dense: true}
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
import math
import numbers
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import MODES, RATIO_NAMES, SHARPNESS_METRICS, ISAConfig, Ratio, validate_budget, validate_ratio
from .timesteps import bucket_index

__all__ = ["ThresholdProfile", "LayerSetting", "ProfileError", "config_hash", "library_versions", "SCHEMA_VERSION"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_KIND = "isa-threshold-profile"
_PER_HEAD = "per_head"
_ERRORS = ("error_target", "error_context")
_METRICS = ("rel_l1",)


class ProfileError(ValueError):
    """A threshold profile file is missing, corrupt, of an unknown schema, or holds invalid values."""


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LayerSetting:
    """ISA settings of one layer (for one timestep bucket).

    Attributes:
        dense: the layer keeps dense attention (no setting met the budget); ratios are then ignored.
        alpha_s, alpha_f, alpha_ns: ratios in (0, 1], a float or one value per head (tuple).
        sharpness: ``"topk_mass"`` or ``"l2"``.
        error_target, error_context: measured relative L1 error of target-query / context-query outputs
            (None when unknown); per head when a tuple.
        relative_cost: predicted kernel time relative to dense attention (None when unknown).
        mode: ``"fixed"`` (the ratios) or ``"adaptive"`` (``docs/ADAPTIVE.md``: ``alpha_s``, ``mass`` and
            ``pseudo_block``; ``alpha_f``, ``alpha_ns`` and ``sharpness`` unused). Only adaptive settings list
            ``mode``, ``mass`` and ``pseudo_block`` in the YAML.
        mass: adaptive mode: pooled-mass threshold, a float or one value per head.
        context_mass: adaptive mode: the threshold of context query blocks (None: ``mass``).
        pseudo_block: adaptive mode: tokens per pseudo-key (None: the block size).
    """

    dense: bool = False
    alpha_s: Ratio = 0.125
    alpha_f: Ratio = 0.5
    alpha_ns: Ratio = 0.0625
    sharpness: str = "topk_mass"
    error_target: Optional[float] = None
    error_context: Optional[float] = None
    relative_cost: Optional[float] = None
    error_target_per_head: Optional[Tuple[float, ...]] = None
    error_context_per_head: Optional[Tuple[float, ...]] = None
    mode: str = "fixed"
    mass: Ratio = 0.9
    pseudo_block: Optional[int] = None
    context_mass: Optional[Ratio] = None

    def __post_init__(self):
        for name in RATIO_NAMES:
            object.__setattr__(self, name, _ratio(name, getattr(self, name)))
        if self.mode not in MODES:
            raise ProfileError(f"mode={self.mode!r} is not supported; supported: {list(MODES)}")
        object.__setattr__(self, "mass", _ratio("mass", self.mass))
        if self.context_mass is not None:
            object.__setattr__(self, "context_mass", _ratio("context_mass", self.context_mass))
        ps = self.pseudo_block
        if ps is not None and (isinstance(ps, bool) or not isinstance(ps, numbers.Integral) or ps < 1):
            raise ProfileError(f"pseudo_block={ps!r} must be a positive integer (tokens per pseudo-key)")
        if self.sharpness not in SHARPNESS_METRICS:
            raise ProfileError(f"sharpness={self.sharpness!r} is not supported; supported: {list(SHARPNESS_METRICS)}")
        heads = {len(getattr(self, n)) for n in self._per_head_names() if isinstance(getattr(self, n), tuple)}
        if len(heads) > 1:
            raise ProfileError(f"per-head ratios have different lengths {sorted(heads)}; give one value per head for each")
        for name in _ERRORS + ("relative_cost",):
            object.__setattr__(self, name, _nonneg(name, getattr(self, name)))
        for name in ("error_target_per_head", "error_context_per_head"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, torch.Tensor):
                    v = v.tolist()
                if not isinstance(v, (list, tuple)):
                    raise ProfileError(f"{name} must be a list of numbers, got {type(v).__name__}")
                object.__setattr__(self, name, tuple(_nonneg(f"{name}[{i}]", x) for i, x in enumerate(v)))
        if not isinstance(self.dense, bool):
            raise ProfileError(f"dense={self.dense!r} must be true or false")

    def _per_head_names(self) -> Tuple[str, ...]:
        return RATIO_NAMES + (("mass", "context_mass") if self.mode == "adaptive" else ())

    @property
    def num_heads(self) -> Optional[int]:
        for n in self._per_head_names():
            v = getattr(self, n)
            if isinstance(v, tuple):
                return len(v)
        return None

    def to_config(self, block_size: int = 64, backend: str = "auto") -> Optional[ISAConfig]:
        """The :class:`ISAConfig` of this setting, or None for a dense layer."""
        if self.dense:
            return None
        if self.mode == "adaptive":
            return ISAConfig(mode="adaptive", alpha_s=self.alpha_s, mass=self.mass, context_mass=self.context_mass,
                             pseudo_block=self.pseudo_block, block_size=block_size, backend=backend)
        return ISAConfig(
            alpha_s=self.alpha_s, alpha_f=self.alpha_f, alpha_ns=self.alpha_ns, block_size=block_size,
            sharpness=self.sharpness, backend=backend,
        )


def _ratio(name: str, value: Any) -> Ratio:
    """:func:`~isa_plugin.config.validate_ratio`, raising :class:`ProfileError` (the profile's error type)."""
    try:
        return validate_ratio(name, value)
    except (TypeError, ValueError) as e:
        raise ProfileError(str(e)) from None


def _nonneg(name: str, v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ProfileError(f"{name}={v!r} must be a number")
    v = float(v)
    if math.isnan(v) or v < 0 or math.isinf(v):
        raise ProfileError(f"{name}={v!r} must be a finite non-negative number")
    return v


# --------------------------------------------------------------------------------------- hashing
def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or type(v) in (str, int, float, bool):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)


def config_hash(model_or_config: Any) -> str:
    """A short SHA-256 of a model's config (keys starting with ``_`` such as ``_name_or_path`` are ignored).

    Args:
        model_or_config: a diffusers model (anything with ``.config``) or a config mapping.

    Returns:
        16 hex digits. Models without a config hash by class name only.

    Example:
        >>> config_hash({"num_layers": 40, "_name_or_path": "x"}) == config_hash({"num_layers": 40})
        True
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    if isinstance(cfg, Mapping):
        data = {k: _plain(v) for k, v in cfg.items() if not str(k).startswith("_")}
    else:
        data = {"class": type(model_or_config).__name__}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a calibration ran with, recorded in a profile's ``calibrated_on``.

    Returns:
        ``{"torch": ..., "isa_plugin": ..., "diffusers": ...}``; a library that cannot be imported is left out.

    Example:
        >>> "torch" in library_versions()
        True
    """
    out = {"torch": str(torch.__version__)}
    try:
        from . import __version__

        out["isa_plugin"] = str(__version__)
    except Exception:  # pragma: no cover - partial import during package init
        pass
    try:
        import diffusers

        out["diffusers"] = str(diffusers.__version__)
    except Exception:
        pass
    return out


# --------------------------------------------------------------------------------------- profile
@dataclass
class ThresholdProfile:
    """Per-layer ISA settings plus the budget and provenance of their calibration.

    Args:
        layers: ``{layer name: [LayerSetting per timestep bucket]}`` (one item when not bucketed).
        budget: ``{"metric": "rel_l1", "target": float, "context": float}``.
        block_size: ISA block size the settings were calibrated for.
        timestep_edges: ascending timestep boundaries; bucket ``b`` holds ``edges[b-1] <= t < edges[b]``
            (``len(edges) + 1`` buckets; empty = one bucket).
        calibrated_on: provenance (transformer_class, config_hash, layer_names, resolution, frames,
            steps, timesteps, num_samples, versions, ...).
        cost_model: the kernel-time model used for ``relative_cost``.

    Example:
        >>> prof = ThresholdProfile.uniform(["blocks.0.attn1"], ISAConfig())
        >>> prof.save("profile.yaml"); ThresholdProfile.load("profile.yaml") == prof
        True
    """

    layers: Dict[str, List[LayerSetting]]
    budget: Dict[str, Any] = field(default_factory=lambda: {"metric": "rel_l1", "target": 0.05, "context": 0.05})
    block_size: int = 64
    timestep_edges: Tuple[float, ...] = ()
    calibrated_on: Dict[str, Any] = field(default_factory=dict)
    cost_model: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not isinstance(self.layers, dict):
            raise ProfileError(f"layers must be a mapping of layer name to settings, got {type(self.layers).__name__}")
        n_buckets = len(self.timestep_edges) + 1
        fixed = {}
        for name, settings in self.layers.items():
            if not isinstance(name, str) or not name:
                raise ProfileError(f"layer name {name!r} must be a non-empty string")
            if isinstance(settings, LayerSetting):
                settings = [settings]
            settings = list(settings)
            if len(settings) != n_buckets:
                raise ProfileError(
                    f"layer {name!r} has {len(settings)} settings but the profile has {n_buckets} timestep bucket(s)"
                )
            for s in settings:
                if not isinstance(s, LayerSetting):
                    raise ProfileError(f"layer {name!r}: settings must be LayerSetting, got {type(s).__name__}")
            fixed[name] = settings
        self.layers = fixed
        edges = tuple(float(e) for e in self.timestep_edges)
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ProfileError(f"timestep_edges {list(edges)} must be strictly ascending")
        self.timestep_edges = edges
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ProfileError(f"block_size={self.block_size!r} must be a positive integer")
        _check_budget(self.budget)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def uniform(cls, layer_names: Sequence[str], config: ISAConfig, **kwargs) -> "ThresholdProfile":
        """A profile that gives every layer the same :class:`ISAConfig` (e.g. the paper's defaults).

        Raises:
            ProfileError: an adaptive config with ``min_blocks`` / ``max_blocks`` set (profiles do not carry them).
        """
        if config.mode == "adaptive" and (config.min_blocks != 1 or config.max_blocks != 0):
            raise ProfileError("profiles do not carry the adaptive mode's min_blocks / max_blocks; leave them at 1 and 0")
        s = LayerSetting(alpha_s=config.alpha_s, alpha_f=config.alpha_f, alpha_ns=config.alpha_ns, sharpness=config.sharpness,
                         **({"mode": "adaptive", "mass": config.mass, "context_mass": config.context_mass,
                             "pseudo_block": config.pseudo_block}
                            if config.mode == "adaptive" else {}))
        kwargs.setdefault("block_size", config.block_size)
        return cls(layers={n: [s] for n in layer_names}, **kwargs)

    # ------------------------------------------------------------------ queries
    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    @property
    def num_buckets(self) -> int:
        return len(self.timestep_edges) + 1

    def bucket_of(self, timestep: Union[float, torch.Tensor, None]) -> int:
        """Index of the timestep bucket holding ``timestep`` (0 when the profile is not bucketed).

        A [B] or [B, S] (per-token) timestep tensor counts as its largest value, as in calibration
        (:func:`isa_plugin.timesteps.bucket_index`). A bucketed profile raises ``ValueError`` for None.
        """
        return bucket_index(timestep, self.timestep_edges)

    def setting(self, layer_name: str, timestep: Optional[float] = None) -> LayerSetting:
        """The :class:`LayerSetting` of one layer (at ``timestep`` when bucketed)."""
        if layer_name not in self.layers:
            raise KeyError(f"layer {layer_name!r} is not in this profile; it has {len(self.layers)} layers, e.g. {self.layer_names[:3]}")
        return self.layers[layer_name][self.bucket_of(timestep)]

    def config_for(self, layer_name: str, timestep: Optional[float] = None, backend: str = "auto") -> Optional[ISAConfig]:
        """The :class:`ISAConfig` of one layer, or None when the layer stays dense."""
        return self.setting(layer_name, timestep).to_config(self.block_size, backend)

    def configs_for(self, transformer=None, timestep: Optional[float] = None, *, layer_names: Optional[Sequence[str]] = None,
                    backend: str = "auto") -> Dict[str, Optional[ISAConfig]]:
        """Per-layer configs: ``{layer name: ISAConfig or None}`` (None = stays dense).

        Args:
            transformer: when given, :meth:`check_compatible` runs first.
            timestep: picks the bucket of a bucketed profile (required then).
            layer_names: the self-attention layers the caller would patch (checked against the profile).

        Raises:
            ValueError: the profile does not fit the transformer, or a bucketed profile without timestep.
        """
        if transformer is not None:
            self.check_compatible(transformer, layer_names=layer_names)
        return {name: self.config_for(name, timestep, backend) for name in self.layers}

    def for_component(self, component: Optional[str]) -> "ThresholdProfile":
        """The part of this profile for one transformer of a pipeline (``"transformer"``, ``"transformer_2"``).

        A profile calibrated on a pipeline with several transformers keys the extra ones' layers
        ``"<component>/<layer>"`` and records their class and config hash under ``calibrated_on["components"]``;
        this returns a profile with that component's layers (prefix removed) and provenance. A profile without
        prefixed layers serves every component as it is.

        Example:
            >>> profile.for_component("transformer_2").layer_names[:1]
            ['blocks.0.attn1']
        """
        if not any("/" in n for n in self.layers):
            return self
        prefix = "" if component in (None, "transformer") else f"{component}/"
        if prefix:
            layers = {n[len(prefix):]: v for n, v in self.layers.items() if n.startswith(prefix)}
        else:
            layers = {n: v for n, v in self.layers.items() if "/" not in n}
        on = {k: v for k, v in (self.calibrated_on or {}).items() if k not in ("components", "layer_names")}
        if prefix:
            on.update((self.calibrated_on.get("components") or {}).get(component, {}))
        on["layer_names"] = list(layers)
        return dataclasses.replace(self, layers=layers, calibrated_on=on)

    def check_compatible(self, transformer, layer_names: Optional[Sequence[str]] = None, *,
                         height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None) -> None:
        """Raise ``ValueError`` unless this profile was calibrated for ``transformer``.

        Checks the transformer class, the config hash and the layer names (every profile layer must be a
        module of ``transformer``; when ``layer_names`` is given, the two sets must be equal). A run at a
        resolution or frame count other than the calibrated one only warns.

        Raises:
            ValueError: naming the mismatch and the fix (recalibrate with ``isa calibrate``).
        """
        on = self.calibrated_on or {}
        cls_name = type(transformer).__name__
        want_cls = on.get("transformer_class")
        if want_cls and want_cls != cls_name:
            raise ValueError(
                f"this ISA profile was calibrated for {want_cls}, not {cls_name}; calibrate one for this model with `isa calibrate`"
            )
        want_hash = on.get("config_hash")
        if want_hash:
            got = config_hash(transformer)
            if got != want_hash:
                raise ValueError(
                    f"this ISA profile was calibrated for a {want_cls or 'model'} with config hash {want_hash}, but this "
                    f"transformer's config hashes to {got} (a different size or variant); recalibrate with `isa calibrate`"
                )
        modules = {n for n, _ in transformer.named_modules()} if hasattr(transformer, "named_modules") else None
        if modules is not None:
            missing = [n for n in self.layers if n not in modules]
            if missing:
                raise ValueError(
                    f"this ISA profile names {len(missing)} layer(s) the transformer does not have, e.g. {missing[:3]}; "
                    "it was calibrated for another model; recalibrate with `isa calibrate`"
                )
        if layer_names is not None:
            want, have = set(self.layers), set(layer_names)
            if want != have:
                extra, lacking = sorted(have - want), sorted(want - have)
                raise ValueError(
                    "the ISA profile's layers do not match the model's self-attention layers "
                    f"(not in profile: {extra[:3]}{'...' if len(extra) > 3 else ''}; not in model: {lacking[:3]}"
                    f"{'...' if len(lacking) > 3 else ''}); recalibrate with `isa calibrate`"
                )
        self.check_run(height=height, width=width, frames=frames)

    def check_run(self, height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None) -> bool:
        """Warn (``UserWarning``) when a run's resolution or frame count differs from the calibrated one.

        Returns:
            True when the run matches (or nothing is known), False when a warning was issued.
        """
        on = self.calibrated_on or {}
        res, fr = on.get("resolution"), on.get("frames")
        msgs = []
        if res and height is not None and width is not None and [int(height), int(width)] != [int(x) for x in res]:
            msgs.append(f"resolution {height}x{width} (calibrated at {res[0]}x{res[1]})")
        if fr and frames is not None and int(frames) != int(fr):
            msgs.append(f"{frames} frames (calibrated on {fr})")
        if msgs:
            text = "ISA profile used at " + " and ".join(msgs) + "; errors may exceed the calibrated budget, consider recalibrating"
            logger.warning(text)
            warnings.warn(text, UserWarning, stacklevel=3)
            return False
        return True

    def check_tokens(self, target: int, context: int) -> bool:
        """Warn (``UserWarning``) when an attention call's token counts differ from the calibrated ones.

        ``calibrated_on["tokens"]`` (target / context tokens per call) is written by the calibration; a
        different count means another resolution or frame count. The ratios still apply.

        Returns:
            True when the call matches (or nothing is known), False when a warning was issued.
        """
        on = self.calibrated_on or {}
        want = on.get("tokens")
        if not isinstance(want, Mapping) or (want.get("target"), want.get("context")) == (target, context):
            return True
        res, fr = on.get("resolution"), on.get("frames")
        size = f"{res[0]}x{res[1]} px, {fr} frames = " if isinstance(res, (list, tuple)) and len(res) == 2 else ""
        text = (f"ISA profile calibrated at {size}{want.get('target')} target + {want.get('context')} context tokens per "
                f"attention call is used on a call with {target} target + {context} context tokens (another resolution or "
                "frame count); its ratios still apply, but errors may exceed the calibrated budget; consider recalibrating "
                "with `isa calibrate`")
        logger.warning(text)
        warnings.warn(text, UserWarning, stacklevel=3)
        return False

    def summary(self) -> Dict[str, Any]:
        """Counts and means for display: layers, dense layers, mean predicted cost, worst errors."""
        settings = [s for ss in self.layers.values() for s in ss]
        costs = [1.0 if s.dense else s.relative_cost for s in settings if s.dense or s.relative_cost is not None]
        et = [s.error_target for s in settings if s.error_target is not None]
        ec = [s.error_context for s in settings if s.error_context is not None]
        return {
            "layers": len(self.layers),
            "dense_layers": sum(all(s.dense for s in ss) for ss in self.layers.values()),
            "buckets": self.num_buckets,
            "mean_relative_cost": sum(costs) / len(costs) if costs else None,
            "max_error_target": max(et) if et else None,
            "max_error_context": max(ec) if ec else None,
        }

    # ------------------------------------------------------------------ serialisation
    def to_yaml_dict(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """The YAML document and the sidecar tensors (per-head values) of this profile."""
        tensors: Dict[str, torch.Tensor] = {}
        layers_out: Dict[str, Any] = {}
        for name, settings in self.layers.items():
            entries = []
            for b, s in enumerate(settings):
                e: Dict[str, Any] = {}
                if s.dense:
                    e["dense"] = True
                else:
                    for r in RATIO_NAMES:
                        v = getattr(s, r)
                        if isinstance(v, tuple):
                            tensors[f"{name}/{b}/{r}"] = torch.tensor(v, dtype=torch.float64)
                            e[r] = _PER_HEAD
                        else:
                            e[r] = v
                    e["sharpness"] = s.sharpness
                    if s.mode == "adaptive":
                        e["mode"] = "adaptive"
                        for k in ("mass", "context_mass"):
                            v = getattr(s, k)
                            if isinstance(v, tuple):
                                tensors[f"{name}/{b}/{k}"] = torch.tensor(v, dtype=torch.float64)
                                e[k] = _PER_HEAD
                            elif v is not None:
                                e[k] = v
                        if s.pseudo_block is not None:
                            e["pseudo_block"] = s.pseudo_block
                for k in _ERRORS + ("relative_cost",):
                    if getattr(s, k) is not None:
                        e[k] = getattr(s, k)
                for k in ("error_target_per_head", "error_context_per_head"):
                    if getattr(s, k) is not None:
                        tensors[f"{name}/{b}/{k}"] = torch.tensor(getattr(s, k), dtype=torch.float64)
                        e[k] = _PER_HEAD
                entries.append(e)
            layers_out[name] = entries[0] if len(entries) == 1 else {"buckets": entries}
        doc = {
            "schema_version": self.schema_version,
            "kind": _KIND,
            "budget": _plain(self.budget),
            "block_size": self.block_size,
            "timestep_edges": list(self.timestep_edges),
            "calibrated_on": _plain(self.calibrated_on),
            "cost_model": _plain(self.cost_model),
            "num_layers": len(layers_out),  # written before the layers: a truncated file is detected on load
            "layers": layers_out,
        }
        return doc, tensors

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the YAML (and the safetensors sidecar when any value is per head) atomically.

        Returns:
            The path of the YAML file.
        """
        import yaml
        from safetensors.torch import save as st_save

        path = Path(path)
        doc, tensors = self.to_yaml_dict()
        sidecar = sidecar_path(path)
        if tensors:
            blob = st_save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"schema_version": str(SCHEMA_VERSION)})
            doc["sidecar"] = {"file": sidecar.name, "sha256": hashlib.sha256(blob).hexdigest()}
            _atomic_write(sidecar, blob)
        text = "# ISA threshold profile (isa-plugin). Read with yaml.safe_load; see `isa inspect`.\n"
        text += yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
        _atomic_write(path, text.encode())
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ThresholdProfile":
        """Read and validate a profile written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            IsADirectoryError: ``path`` is a folder (the message suggests the profile file inside it).
            ProfileError (a ``ValueError``): truncated or corrupt YAML or sidecar, unknown schema version,
                wrong types, or out-of-range ratios; the message names the file and the field.
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
            return cls._from_doc(doc, tensors)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from None

    @classmethod
    def _from_doc(cls, doc: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "ThresholdProfile":
        layers_doc = doc["layers"]
        if not isinstance(layers_doc, dict) or not layers_doc:
            raise ProfileError("'layers' must be a non-empty mapping of layer name to settings")
        edges = doc.get("timestep_edges") or []
        if not isinstance(edges, list) or not all(isinstance(e, numbers.Real) and not isinstance(e, bool) for e in edges):
            raise ProfileError(f"timestep_edges={edges!r} must be a list of numbers")
        n_buckets = len(edges) + 1
        used = set()
        layers: Dict[str, List[LayerSetting]] = {}
        known = {f.name for f in fields(LayerSetting)}
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
                if not isinstance(e, dict):
                    raise ProfileError(f"layer {name!r}: settings must be a mapping, got {type(e).__name__}")
                unknown = sorted(set(e) - known)
                if unknown:
                    raise ProfileError(f"layer {name!r}: unknown keys {unknown}; known: {sorted(known)}")
                kw = {}
                for k, v in e.items():
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
                try:
                    settings.append(LayerSetting(**kw))
                except ProfileError as err:
                    raise ProfileError(f"layer {name!r}: {err}") from None
            layers[name] = settings
        block_size = doc.get("block_size", 64)
        cal = doc.get("calibrated_on") or {}
        if not isinstance(cal, dict):
            raise ProfileError(f"calibrated_on must be a mapping, got {type(cal).__name__}")
        cm = doc.get("cost_model") or {}
        if not isinstance(cm, dict):
            raise ProfileError(f"cost_model must be a mapping, got {type(cm).__name__}")
        return cls(layers=layers, budget=doc["budget"], block_size=block_size, timestep_edges=tuple(edges),
                   calibrated_on=cal, cost_model=cm)

    def __eq__(self, other) -> bool:
        if not isinstance(other, ThresholdProfile):
            return NotImplemented
        a, ta = self.to_yaml_dict()
        b, tb = other.to_yaml_dict()
        return a == b and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _check_budget(budget: Any) -> None:
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
