"""diffusers integration: ISA processors, apply/remove/stats, and one adapter module per model family.

Modules (each one job):

- :mod:`.context` — the per-call context (:class:`StepInfo`, :class:`CallContext`) and layout providers;
- :mod:`.processor` — :class:`ISAAttnProcessorBase`: eligibility, observation, counting, the attention call;
- :mod:`.masking` — key-padding masks under ISA; :mod:`.rope` — the rotary embeddings of the families;
- :mod:`.registry` — :class:`FamilyAdapter`, :class:`PipelineAdapter` and their registry;
- :mod:`.install` — :func:`apply_isa`, :func:`remove_isa`, :func:`stats`, :func:`observe_attention`;
- :mod:`.isa_processor` — :class:`ISAProcessor`, ISA through diffusers' ``set_attn_processor``;
- :mod:`.defaults` — ISA a pipeline runs by default (LIVEditor's), the user's installation kept;
- :mod:`.families` — one module per model family, discovered on first use of the registry (diffusers is
  imported only then); a family's names are imported from ``isa_plugin.adapters.families.<name>``.
"""

from .context import CallContext, LayoutProvider, StepInfo
from .install import ISAState, apply_isa, is_isa_applied, isa_processors, observe_attention, remove_isa, reset_stats, stats
from .isa_processor import ISAProcessor
from .processor import ISAAttnProcessorBase, LayerCounters
from .registry import (
    FamilyAdapter,
    PipelineAdapter,
    family_for,
    load_adapter_modules,
    register_family,
    register_pipeline,
    registered_families,
    registered_pipelines,
)

__all__ = [
    "apply_isa",
    "remove_isa",
    "stats",
    "reset_stats",
    "observe_attention",
    "isa_processors",
    "is_isa_applied",
    "ISAProcessor",
    "ISAAttnProcessorBase",
    "LayerCounters",
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
