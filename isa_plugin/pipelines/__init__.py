"""Pipelines that diffusers lacks, needed to run in-context layouts end to end (imports diffusers)."""

from .wan_icl import WanInContextEditPipeline

__all__ = ["WanInContextEditPipeline"]
