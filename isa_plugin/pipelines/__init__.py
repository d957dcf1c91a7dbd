"""Pipelines that diffusers lacks, needed to run in-context layouts end to end.

The pipelines and models import diffusers; they are imported on first access (``isa_plugin.pipelines.
LIVEditorPipeline``), so that the diffusers-free modules of this package (:mod:`.wan_attention`, which the
adapters use) load without it. The package's own models use the kernels and the core types, never the
adapters; ``LIVEditorPipeline`` imports them only inside its call, to run ISA by default.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> module that defines it, imported on first access
_LAZY = {
    "WanInContextEditPipeline": "isa_plugin.pipelines.wan_icl",
    "LIVEditorTransformer3DModel": "isa_plugin.pipelines.liveditor",
    "LIVEditorPipeline": "isa_plugin.pipelines.liveditor_pipeline",
}

__all__ = ["WanInContextEditPipeline", "LIVEditorTransformer3DModel", "LIVEditorPipeline"]

if TYPE_CHECKING:  # pragma: no cover
    from .liveditor import LIVEditorTransformer3DModel
    from .liveditor_pipeline import LIVEditorPipeline
    from .wan_icl import WanInContextEditPipeline


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isa_plugin.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
