"""isa-plugin: In-context Sparse Attention (ISA) for in-context video editing pipelines in diffusers.

``import isa_plugin`` imports nothing heavy: every public name is imported on first access, the core
(``Layout``, ``ISAConfig``, ``isa_attention``) with torch only, the diffusers integration, profiles and
calibration when first used. The command line (``isa --help``) therefore starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> module that defines it, imported on first access
_LAZY = {
    "Layout": "isa_plugin.layout",
    "ISAConfig": "isa_plugin.config",
    "ISAInfo": "isa_plugin.attention",
    "isa_attention": "isa_plugin.attention",
    "apply_isa": "isa_plugin.adapters.install",
    "remove_isa": "isa_plugin.adapters.install",
    "stats": "isa_plugin.adapters.install",
    "ISAProcessor": "isa_plugin.adapters.isa_processor",
    "ThresholdProfile": "isa_plugin.profile",
    "fit_profile": "isa_plugin.calibration.fit",
}

__all__ = ["Layout", "ISAConfig", "ISAInfo", "isa_attention", "apply_isa", "remove_isa", "stats", "ISAProcessor", "ThresholdProfile", "fit_profile", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.install import apply_isa, remove_isa, stats
    from .adapters.isa_processor import ISAProcessor
    from .attention import ISAInfo, isa_attention
    from .config import ISAConfig
    from .layout import Layout
    from .calibration.fit import fit_profile
    from .profile import ThresholdProfile


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isa_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
