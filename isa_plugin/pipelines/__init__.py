"""Pipelines that diffusers lacks, needed to run in-context layouts end to end (imports diffusers)."""

from .liveditor import LIVEditorTransformer3DModel
from .liveditor_pipeline import LIVEditorPipeline
from .wan_icl import WanInContextEditPipeline

__all__ = ["WanInContextEditPipeline", "LIVEditorTransformer3DModel", "LIVEditorPipeline"]
