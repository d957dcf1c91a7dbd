"""Threshold profiles: per-layer ISA ratios measured on a user's own model and videos.

A :class:`ThresholdProfile` is what :func:`isa_plugin.calibration.fit_profile` writes and what
``apply_isa`` reads. It holds, per attention layer (exact module name, e.g. ``"blocks.0.attn1"``):

- the layer's selection mode and its settings (for the default fixed mode the ratios α_s, α_f, α_ns and
  the sharpness metric), scalars or one value per head, optionally one setting per timestep bucket;
- or ``dense: true`` when no setting met the error budget;
- the measured error (relative L1 of the attention output against dense, separately for target-query and
  context-query outputs) and the predicted cost relative to dense attention;

plus the error budget and what the profile was calibrated on (transformer class, a hash of its config,
layer names, resolution, frames, steps, number of samples, library versions).

On disk a profile is a YAML file and, when any value is per head, a safetensors sidecar next to it
(:mod:`isa_plugin.profile_io`).

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
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import ISAConfig
from .layer_setting import LayerSetting, ProfileError
from .profile_io import SCHEMA_VERSION, check_budget, plain, profile_to_doc, save_profile, load_profile
from .timesteps import bucket_index

__all__ = ["ThresholdProfile", "config_hash", "library_versions"]

logger = logging.getLogger(__name__)

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
        data = {k: plain(v) for k, v in cfg.items() if not str(k).startswith("_")}
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
        check_budget(self.budget)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def uniform(cls, layer_names: Sequence[str], config: ISAConfig, **kwargs) -> "ThresholdProfile":
        """A profile that gives every layer the same :class:`ISAConfig` (e.g. the paper's defaults).

        Raises:
            ProfileError: a setting profiles do not carry (e.g. the adaptive mode's ``min_blocks`` / ``max_blocks``).
        """
        s = LayerSetting(config.replace(backend="auto", share_plan=False))
        profile_to_doc(cls(layers={"layer": [s]}))  # raises ProfileError for settings a profile cannot carry
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
        return profile_to_doc(self)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the YAML (and the safetensors sidecar when any value is per head) atomically.

        Returns:
            The path of the YAML file.
        """
        return save_profile(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ThresholdProfile":
        """Read and validate a profile written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            IsADirectoryError: ``path`` is a folder (the message suggests the profile file inside it).
            ProfileError (a ``ValueError``): truncated or corrupt YAML or sidecar, unknown schema version,
                wrong types, or out-of-range values; the message names the file and the field.
        """
        return cls(**load_profile(path))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ThresholdProfile):
            return NotImplemented
        a, ta = self.to_yaml_dict()
        b, tb = other.to_yaml_dict()
        return a == b and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


