"""The registry of family and pipeline adapters.

A family module in :mod:`isa_plugin.adapters.families` defines

1. one or more processor classes, subclasses of :class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`,
   each reproducing one stock diffusers processor exactly (same ``__call__`` parameter names, projections,
   fused-projection handling, norms, RoPE) and replacing only the attention call by ``self.attend(...)``;
2. a :class:`FamilyAdapter` subclass instance, registered with :func:`register_family`, that names the
   transformer classes it serves, the self/joint-attention layers (never cross-attention, control or
   refiner blocks, audio streams), the processor class, and may infer the layout of a call from the
   transformer's forward arguments (:meth:`FamilyAdapter.layout_for_call`);
3. :class:`PipelineAdapter` instances (:func:`register_pipeline`) for the pipelines it serves; subclasses
   give the layout for pipelines whose transformer call alone does not reveal it.

The module's docstring documents the family (layers touched, layout rules). Families are discovered by
:func:`load_adapter_modules` on first use of the registry, so diffusers is imported only then.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..config import ISAConfig
from .context import LayoutProvider
from .processor import ISAAttnProcessorBase

__all__ = ["FamilyAdapter", "PipelineAdapter", "register_family", "register_pipeline", "registered_families",
           "registered_pipelines", "family_for", "load_adapter_modules", "lookup", "ensure_loaded", "families_table"]


class FamilyAdapter:
    """One model family: which transformer classes, which layers, which processors, which layout.

    Subclasses set :attr:`name`, :attr:`transformer_classes` (class names, matched along the MRO) and
    implement :meth:`self_attention_layers` and :meth:`make_processor`; :meth:`layout_for_call` is optional.
    """

    name: str = ""
    transformer_classes: Tuple[str, ...] = ()
    #: class names of the stock processors the family replaces; apply_isa refuses layers running others
    stock_processor_names: Tuple[str, ...] = ()

    #: ``(block list attribute, attention attribute)`` pairs :meth:`self_attention_layers` walks by default,
    #: e.g. ``(("blocks", "attn1"),)`` gives ``blocks.0.attn1``, ``blocks.1.attn1``, ...
    layer_paths: Tuple[Tuple[str, str], ...] = ()

    def self_attention_layers(self, transformer: torch.nn.Module) -> "OrderedDict[str, torch.nn.Module]":
        """Ordered mapping layer name (module path) -> attention module that ISA serves (default: :attr:`layer_paths`)."""
        if not self.layer_paths:
            raise NotImplementedError(f"{type(self).__name__} sets no layer_paths and does not override self_attention_layers")
        return OrderedDict(
            (f"{blocks}.{i}.{attr}", getattr(blk, attr))
            for blocks, attr in self.layer_paths
            for i, blk in enumerate(getattr(transformer, blocks))
        )

    #: the processor class :meth:`make_processor` builds by default
    processor_class: Optional[type] = None

    def make_processor(self, layer_name: str, module: torch.nn.Module, config: Optional[ISAConfig], original: Any) -> ISAAttnProcessorBase:
        """The ISA processor replacing ``original`` on ``module`` (default: :attr:`processor_class`)."""
        if self.processor_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no processor_class and does not override make_processor")
        return self.processor_class(config, layer_name=layer_name, original=original)

    def layout_for_call(self, transformer: torch.nn.Module, arguments: Mapping[str, Any]):
        """Layout inferred from the forward arguments alone (None: unknown). See :class:`LayoutProvider`."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {', '.join(self.transformer_classes)}>"


class PipelineAdapter:
    """Layout rules of one pipeline family.

    Subclass (set :attr:`name`, :attr:`pipeline_classes`, implement :meth:`layout_provider`) for pipelines
    whose transformer call does not reveal the layout. For pipelines the family adapter's inference already
    serves, register a plain instance, ``PipelineAdapter("flux-kontext", ("FluxKontextPipeline",))``: it
    lists the pipeline as supported (CLI ``--adapter`` names, :func:`registered_pipelines`).

    Args:
        name: the adapter's name (``isa calibrate --adapter NAME``).
        pipeline_classes: pipeline class names served (matched along the MRO).
    """

    name: str = ""
    pipeline_classes: Tuple[str, ...] = ()

    def __init__(self, name: Optional[str] = None, pipeline_classes: Optional[Sequence[str]] = None):
        if name is not None:
            self.name = name
        if pipeline_classes is not None:
            self.pipeline_classes = tuple(pipeline_classes)

    def layout_provider(self, pipe: Any, component: str) -> Optional[LayoutProvider]:
        """A provider for the transformer ``getattr(pipe, component)`` (default None: the family's inference)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {', '.join(self.pipeline_classes)}>"


_FAMILIES: "OrderedDict[str, FamilyAdapter]" = OrderedDict()  # transformer class name -> adapter
_PIPELINES: "OrderedDict[str, PipelineAdapter]" = OrderedDict()  # pipeline class name -> adapter
_LOADED = False


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register a :class:`FamilyAdapter` for each of its transformer class names; returns it."""
    if not isinstance(adapter, FamilyAdapter) or not adapter.transformer_classes:
        raise TypeError(f"register_family expects a FamilyAdapter naming its transformer classes, got {adapter!r}")
    for cls_name in adapter.transformer_classes:
        prev = _FAMILIES.get(cls_name)
        if prev is not None and type(prev) is not type(adapter):
            raise ValueError(f"transformer class {cls_name} is already served by {prev!r}")
        _FAMILIES[cls_name] = adapter
    return adapter


def register_pipeline(adapter: PipelineAdapter) -> PipelineAdapter:
    """Register a :class:`PipelineAdapter` for each of its pipeline class names; returns it."""
    if not isinstance(adapter, PipelineAdapter) or not adapter.pipeline_classes:
        raise TypeError(f"register_pipeline expects a PipelineAdapter naming its pipeline classes, got {adapter!r}")
    for cls_name in adapter.pipeline_classes:
        prev = _PIPELINES.get(cls_name)
        if prev is not None and (type(prev) is not type(adapter) or prev.name != adapter.name):
            raise ValueError(f"pipeline class {cls_name} is already served by {prev!r}")
        _PIPELINES[cls_name] = adapter
    return adapter


def load_adapter_modules() -> List[str]:
    """Import every family module of ``isa_plugin.adapters.families`` (each registers itself); returns their names.

    Adding a family is adding a module there; shared code lives in the modules of ``isa_plugin.adapters``.
    """
    global _LOADED
    from .families import __name__ as pkg_name, __path__ as pkg_path

    names = sorted(m.name for m in pkgutil.iter_modules(pkg_path) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{pkg_name}.{name}")
    _LOADED = True
    return names


def ensure_loaded() -> None:
    """Load the family modules once."""
    if not _LOADED:
        load_adapter_modules()


def registered_families() -> Dict[str, FamilyAdapter]:
    """Transformer class name -> :class:`FamilyAdapter`, for every registered family."""
    ensure_loaded()
    return dict(_FAMILIES)


def registered_pipelines() -> Dict[str, PipelineAdapter]:
    """Pipeline class name -> :class:`PipelineAdapter`, for every registered pipeline adapter."""
    ensure_loaded()
    return dict(_PIPELINES)


def lookup(obj, table: Mapping[str, Any]):
    """The entry of ``table`` (class name -> adapter) for ``obj``'s class or its nearest base (None)."""
    for cls in type(obj).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def family_for(transformer: torch.nn.Module) -> FamilyAdapter:
    """The :class:`FamilyAdapter` serving ``transformer``.

    Raises:
        TypeError: the class is not supported (the message lists the supported classes).
    """
    ensure_loaded()
    fam = lookup(transformer, _FAMILIES)
    if fam is None:
        raise TypeError(
            f"{type(transformer).__name__} is not supported by isa_plugin; supported transformer classes: "
            f"{sorted(_FAMILIES)}"
        )
    return fam




def families_table() -> Dict[str, FamilyAdapter]:
    """The registered transformer class names -> adapters, without loading (for error messages)."""
    return dict(_FAMILIES)
