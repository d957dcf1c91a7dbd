"""Per-call context of a transformer forward, and the layout providers that fill it.

:func:`isa_plugin.apply_isa` registers a forward pre-hook on the transformer; for every forward it binds
the arguments, asks the layout provider for the call's layout and stores a :class:`CallContext` (layout
and :class:`StepInfo`) that the processors read. Layout precedence: the ``layout=`` given to ``apply_isa``
> the pipeline adapter > the family adapter's inference from the call (:class:`ChainedLayout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch

from ..layout import Layout

if TYPE_CHECKING:  # pragma: no cover
    from .registry import FamilyAdapter

__all__ = ["StepInfo", "CallContext", "LayoutProvider", "StaticLayout", "ChainedLayout", "FamilyLayout", "call_layout",
           "user_provider", "LayoutSpec"]

logger = logging.getLogger(__name__)

LayoutSpec = Union[Layout, "LayoutProvider", Callable[[int], Layout]]


@dataclass(frozen=True)
class StepInfo:
    """What a processor knows about the denoising call it serves.

    Attributes:
        timestep: the transformer's ``timestep`` argument as passed ([B] or per-token [B, S]), or None.
        call_index: number of transformer forwards since :func:`isa_plugin.apply_isa` (or the last
            :func:`~isa_plugin.adapters.reset_stats`), starting at 0. With separate cond/uncond calls it
            counts both.
        arguments: the bound forward arguments of the call (name -> value), for recorders that need more.
    """

    timestep: Optional[torch.Tensor] = None
    call_index: int = 0
    arguments: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CallContext:
    """Per-forward information filled by the transformer pre-hook and read by the processors.

    Attributes:
        layout: the call's :class:`Layout`, a callable ``seq_len -> Layout``, or None (unknown).
        step: the call's :class:`StepInfo`.
    """

    layout: Union[Layout, Callable[[int], Optional[Layout]], None]
    step: StepInfo
    _layouts: Dict[int, Optional[Layout]] = field(default_factory=dict, repr=False)
    _caches: Dict[str, Dict[Any, Any]] = field(default_factory=dict, repr=False)

    def layout_for(self, seq_len: int) -> Optional[Layout]:
        """The layout for an attention call over ``seq_len`` tokens (None when unknown)."""
        if self.layout is None or isinstance(self.layout, Layout):
            return self.layout
        if seq_len not in self._layouts:
            self._layouts[seq_len] = call_layout(self.layout, seq_len)
        return self._layouts[seq_len]

    def cache(self, name: str) -> Dict[Any, Any]:
        """A dict living for this transformer call only (work shared by all layers of the call)."""
        return self._caches.setdefault(name, {})


def call_layout(fn: Callable[[int], Optional[Layout]], seq_len: int) -> Optional[Layout]:
    """``fn(seq_len)``; a callable that raises or returns something other than a Layout gives None
    (the call runs dense, counted as ``"layout unknown"``), as a failing :class:`LayoutProvider` does."""
    try:
        out = fn(seq_len)
    except Exception as exc:
        logger.warning("ISA layout callable %r failed for %d tokens (%s); this call runs dense attention", fn, seq_len, exc)
        return None
    if out is not None and not isinstance(out, Layout):
        logger.warning("ISA layout callable %r returned %r, not a Layout; this call runs dense attention", fn, out)
        return None
    return out


class LayoutProvider:
    """Computes the layout of one transformer call from its forward arguments.

    Subclass and implement :meth:`__call__`. Instances can be passed as ``layout=`` to
    :func:`isa_plugin.apply_isa` (for example :class:`isa_plugin.adapters.families.wan.WanICLLayout`), and pipeline
    adapters return them.
    """

    def __call__(self, transformer: torch.nn.Module, arguments: Mapping[str, Any]) -> Union[Layout, Callable[[int], Optional[Layout]], None]:
        """Return a Layout, a callable ``seq_len -> Layout``, or None when the layout is unknown."""
        raise NotImplementedError


class StaticLayout(LayoutProvider):
    """The same layout (or ``seq_len -> Layout`` callable) for every call."""

    def __init__(self, layout):
        self.layout = layout

    def __call__(self, transformer, arguments):
        return self.layout

    def __repr__(self):
        return f"StaticLayout({self.layout!r})"


class ChainedLayout(LayoutProvider):
    """First provider that returns a layout wins."""

    def __init__(self, providers: Sequence[LayoutProvider]):
        self.providers = list(providers)

    def __call__(self, transformer, arguments):
        for p in self.providers:
            out = p(transformer, arguments)
            if out is not None:
                return out
        return None


class FamilyLayout(LayoutProvider):
    """The family adapter's inference from the forward arguments (:meth:`FamilyAdapter.layout_for_call`)."""

    def __init__(self, family: "FamilyAdapter"):
        self.family = family

    def __call__(self, transformer, arguments):
        return self.family.layout_for_call(transformer, arguments)

    def __repr__(self):
        return f"FamilyLayout({self.family.name!r})"


def user_provider(layout) -> Optional[LayoutProvider]:
    """The provider for a user's ``layout=`` argument (None when not given)."""
    if layout is None:
        return None
    if isinstance(layout, LayoutProvider):
        return layout
    if isinstance(layout, Layout) or callable(layout):
        return StaticLayout(layout)
    raise TypeError(f"layout must be a Layout, a LayoutProvider or a callable seq_len -> Layout; got {type(layout).__name__}")
