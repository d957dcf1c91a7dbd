"""One layer's calibrated setting: an :class:`~isa_plugin.ISAConfig` (or dense attention) plus what was measured."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from .config import ISAConfig
from .selection import DEFAULT_MODE

__all__ = ["LayerSetting", "ProfileError"]


class ProfileError(ValueError):
    """A threshold profile file is missing, corrupt, of an unknown schema, or holds invalid values."""


_MEASURED = ("error_target", "error_context", "relative_cost")


@dataclass(frozen=True, init=False)
class LayerSetting:
    """The ISA setting of one layer (for one timestep bucket) and its measured numbers.

    Args:
        config: the layer's :class:`~isa_plugin.ISAConfig` (its block size and backend are the profile's
            concern: :meth:`to_config` sets them); None keeps the layer dense.
        dense: True for a dense layer (the same as ``config=None``).
        error_target, error_context: measured relative L1 error of target-query / context-query outputs
            (None when unknown).
        relative_cost: predicted kernel time relative to dense attention (None when unknown).
        error_target_per_head, error_context_per_head: the same errors per head (None when not per head).
        mode, **settings: instead of ``config``, the mode and its settings (``LayerSetting(alpha_s=0.25,
            alpha_f=0.5, alpha_ns=0.0625)``; ``LayerSetting(mode="adaptive", mass=0.9)``).

    Settings are read as attributes (``setting.alpha_s``, ``setting.mode``).

    Raises:
        ProfileError (a ``ValueError``): settings the mode refuses, per-head values of different lengths,
            negative or non-finite errors.

    Example:
        >>> s = LayerSetting(alpha_s=0.25, error_target=0.03, error_context=0.04)
        >>> s.to_config(block_size=128).block_size, s.alpha_s
        (128, 0.25)
    """

    config: Optional[ISAConfig]
    error_target: Optional[float]
    error_context: Optional[float]
    relative_cost: Optional[float]
    error_target_per_head: Optional[Tuple[float, ...]]
    error_context_per_head: Optional[Tuple[float, ...]]

    def __init__(self, config: Optional[ISAConfig] = None, *, dense: bool = False, error_target=None, error_context=None,
                 relative_cost=None, error_target_per_head=None, error_context_per_head=None, mode: Optional[str] = None,
                 **settings):
        if not isinstance(dense, bool):
            raise ProfileError(f"dense={dense!r} must be true or false")
        if config is not None and (settings or mode is not None):
            raise TypeError("give LayerSetting either a config or the mode and its settings, not both")
        if config is None and not dense:
            try:
                config = ISAConfig(mode or DEFAULT_MODE, **settings)
            except (TypeError, ValueError) as e:
                raise ProfileError(str(e).replace("ISAConfig.", "")) from None
        if dense:
            config = None
        if config is not None:
            if not isinstance(config, ISAConfig):
                raise TypeError(f"LayerSetting.config must be an ISAConfig or None, got {type(config).__name__}")
            if config.num_heads == -1:
                raise ProfileError("per-head ratios have different lengths; give one value per head for each")
        set_ = lambda n, v: object.__setattr__(self, n, v)  # noqa: E731
        set_("config", config)
        for name, v in zip(_MEASURED, (error_target, error_context, relative_cost)):
            set_(name, _nonneg(name, v))
        for name, v in (("error_target_per_head", error_target_per_head), ("error_context_per_head", error_context_per_head)):
            if v is not None:
                if isinstance(v, torch.Tensor):
                    v = v.tolist()
                if not isinstance(v, (list, tuple)):
                    raise ProfileError(f"{name} must be a list of numbers, got {type(v).__name__}")
                v = tuple(_nonneg(f"{name}[{i}]", x) for i, x in enumerate(v))
            set_(name, v)

    def __getattr__(self, name: str) -> Any:
        config = object.__getattribute__(self, "config")
        if name.startswith("_") or config is None:
            raise AttributeError(f"a dense LayerSetting has no setting {name!r}")
        return getattr(config, name)

    @property
    def dense(self) -> bool:
        """True when the layer keeps dense attention."""
        return self.config is None

    @property
    def mode(self) -> Optional[str]:
        """The selection mode (None for a dense layer)."""
        return None if self.config is None else self.config.mode

    @property
    def num_heads(self) -> Optional[int]:
        return None if self.config is None else self.config.num_heads

    def to_config(self, block_size: int = 64, backend: str = "auto") -> Optional[ISAConfig]:
        """The :class:`ISAConfig` of this setting at the profile's block size, or None for a dense layer."""
        if self.config is None:
            return None
        if (self.config.block_size, self.config.backend) == (block_size, backend):
            return self.config
        return self.config.replace(block_size=block_size, backend=backend)



def _nonneg(name: str, v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ProfileError(f"{name}={v!r} must be a number")
    v = float(v)
    if math.isnan(v) or v < 0 or math.isinf(v):
        raise ProfileError(f"{name}={v!r} must be a finite non-negative number")
    return v
