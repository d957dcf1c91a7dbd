"""diffusers integration: ISA processors, apply/remove/stats, and one adapter module per model family.

diffusers is imported only by the family modules, which are loaded on first use of the registry
(:func:`load_adapter_modules`). See :mod:`isa_plugin.adapters.base` for the adapter contract, the
per-call context and the observation hook used by calibration.
"""

from .base import (
    CallContext,
    FamilyAdapter,
    ISAAttnProcessorBase,
    ISAState,
    LayoutProvider,
    PipelineAdapter,
    StepInfo,
    apply_isa,
    family_for,
    is_isa_applied,
    isa_processors,
    load_adapter_modules,
    observe_attention,
    register_family,
    register_pipeline,
    registered_families,
    registered_pipelines,
    remove_isa,
    reset_stats,
    stats,
)

__all__ = [
    "apply_isa",
    "remove_isa",
    "stats",
    "reset_stats",
    "observe_attention",
    "isa_processors",
    "is_isa_applied",
    "ISAAttnProcessorBase",
    "FamilyAdapter",
    "PipelineAdapter",
    "LayoutProvider",
    "CallContext",
    "StepInfo",
    "ISAState",
    "register_family",
    "register_pipeline",
    "registered_families",
    "registered_pipelines",
    "family_for",
    "load_adapter_modules",
]
