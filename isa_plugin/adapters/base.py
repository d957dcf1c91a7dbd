"""Alias module kept so that existing imports keep working; the code lives in :mod:`.context`,
:mod:`.processor`, :mod:`.registry` and :mod:`.install`."""

from .context import CallContext, LayoutProvider, StepInfo  # noqa: F401
from .install import (  # noqa: F401
    ISAState,
    apply_isa,
    is_isa_applied,
    isa_processors,
    observe_attention,
    remove_isa,
    reset_stats,
    stats,
)
from .processor import ISAAttnProcessorBase, LayerCounters  # noqa: F401
from .registry import (  # noqa: F401
    FamilyAdapter,
    PipelineAdapter,
    family_for,
    load_adapter_modules,
    register_family,
    register_pipeline,
    registered_families,
    registered_pipelines,
)
