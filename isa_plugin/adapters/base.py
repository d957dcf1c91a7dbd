"""diffusers integration framework: ISA processors, per-call context, registry, apply/remove/stats.

Contract (what every family adapter module in ``isa_plugin/adapters/`` provides)
--------------------------------------------------------------------------------
A family module (``wan.py``, ``ltx.py``, ...) defines

1. one or more processor classes, subclasses of :class:`ISAAttnProcessorBase`, each reproducing one
   stock diffusers processor exactly (same ``__call__`` parameter names, projections, fused-projection
   handling, norms, RoPE) and replacing only the attention call by ``self._attend(...)``;
2. a :class:`FamilyAdapter` subclass instance, registered with :func:`register_family`, that names the
   transformer classes it serves, picks the self/joint-attention layers (never cross-attention, control
   or refiner blocks, audio streams), builds the processor for each, and may infer the layout of a call
   from the transformer's forward arguments (:meth:`FamilyAdapter.layout_for_call`);
3. optionally :class:`PipelineAdapter` instances (:func:`register_pipeline`) that give the layout for a
   pipeline class whose transformer call alone does not reveal it.

The module's docstring documents the family (layers touched, layout rules). Modules are discovered
by :func:`load_adapter_modules` (every module of this package except ``base``), so adding a family is
adding a file.

Per-call flow
-------------
:func:`apply_isa` installs, per instance, one processor per selected layer through
``transformer.set_attn_processor(dict)`` (all other entries are passed back unchanged), and registers a
forward pre-hook (``with_kwargs=True``) plus an always-called forward hook on the transformer. The pre-hook
binds the forward arguments, computes a :class:`CallContext` (the layout, or a function of the sequence
length giving it, and a :class:`StepInfo`) and stores it on the shared :class:`ISAState`; the post-hook
clears it. Layout precedence: the ``layout=`` given to :func:`apply_isa` > the pipeline adapter > the
family adapter's inference from the call.

Each processor checks eligibility per call (dense mode, no config, context parallelism, attention mask,
layout unknown / wrong length / no context span, dtype, head_dim, fewer than two blocks, kernels
unavailable on the device) and otherwise calls :func:`isa_plugin.isa_attention`. Ineligible calls run the
model's own dense path (``dispatch_attention_fn`` with the processor's backend and parallel config, or the
stock processor object itself for structurally different calls), and are counted per layer with their
reason; see :func:`stats`.

Observation hook (calibration)
------------------------------
Every ISA processor has two plain attributes:

- ``observer``: ``None`` or a callable ``observer(layer_name, q, k, v, layout, step_info) -> None``,
  called right before the attention call with q, k, v as the backend would get them ([B, N, H, D], after
  norms and RoPE), the resolved :class:`~isa_plugin.Layout` (or ``None`` when unknown) and the call's
  :class:`StepInfo` (timestep, call index). It must not modify its inputs.
- ``force_dense``: when True the processor computes the stock dense attention (counted as a fallback
  with reason ``"dense mode"``) while still calling the observer.

:func:`observe_attention` is the context manager a recorder uses: on a model without ISA it installs
processors in dense mode for the duration; on a model with ISA it switches them to dense mode (or not,
``dense=False``) and restores everything on exit.

Thresholds (:class:`~isa_plugin.ISAConfig`) are plain attributes of the processors; no module buffers or
parameters are added, so ``state_dict()`` is unchanged. A threshold profile with timestep buckets
(``num_buckets > 1``, ``timestep_edges``, ``bucket_of(t)``) is expanded at apply time into one config set per
bucket; the pre-hook switches the processors' ``config`` to the bucket of each call's timestep (the
transformer's ``timestep`` argument; per-token timesteps use the largest value of the first batch entry).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import pkgutil
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..attention import isa_attention
from ..config import ISAConfig
from ..layout import Layout

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

logger = logging.getLogger(__name__)

LayoutSpec = Union[Layout, "LayoutProvider", Callable[[int], Layout]]
Observer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Optional[Layout], "StepInfo"], None]

_STATE_ATTR = "_isa_state"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- per-call context
@dataclass(frozen=True)
class StepInfo:
    """What a processor knows about the denoising call it serves.

    Attributes:
        timestep: the transformer's ``timestep`` argument as passed ([B] or per-token [B, S]), or None.
        call_index: number of transformer forwards since :func:`apply_isa` (or the last
            :func:`reset_stats`), starting at 0. With separate cond/uncond calls it counts both.
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
    _cache: Dict[int, Optional[Layout]] = field(default_factory=dict, repr=False)

    def layout_for(self, seq_len: int) -> Optional[Layout]:
        """The layout for an attention call over ``seq_len`` tokens (None when unknown)."""
        if self.layout is None or isinstance(self.layout, Layout):
            return self.layout
        if seq_len not in self._cache:
            self._cache[seq_len] = _call_layout(self.layout, seq_len)
        return self._cache[seq_len]


def _call_layout(fn: Callable[[int], Optional[Layout]], seq_len: int) -> Optional[Layout]:
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

    Subclass and implement :meth:`__call__`. Instances can be passed as ``layout=`` to :func:`apply_isa`
    (for example :class:`isa_plugin.adapters.wan.WanICLLayout`), and pipeline adapters return them.
    """

    def __call__(self, transformer: torch.nn.Module, arguments: Mapping[str, Any]) -> Union[Layout, Callable[[int], Optional[Layout]], None]:
        """Return a Layout, a callable ``seq_len -> Layout``, or None when the layout is unknown."""
        raise NotImplementedError


class _StaticLayout(LayoutProvider):
    def __init__(self, layout):
        self.layout = layout

    def __call__(self, transformer, arguments):
        return self.layout

    def __repr__(self):
        return f"_StaticLayout({self.layout!r})"


class _ChainedLayout(LayoutProvider):
    """First provider that returns a layout wins."""

    def __init__(self, providers: Sequence[LayoutProvider]):
        self.providers = list(providers)

    def __call__(self, transformer, arguments):
        for p in self.providers:
            out = p(transformer, arguments)
            if out is not None:
                return out
        return None


@dataclass
class LayerStats:
    """Counters of one ISA layer."""

    isa_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)

    def as_dict(self) -> Dict[str, Any]:
        return {"isa_calls": self.isa_calls, "fallbacks": sum(self.fallbacks.values()), "reasons": dict(self.fallbacks),
                "backends": dict(self.backends)}


class ISAState:
    """What :func:`apply_isa` attaches to a transformer (plain attribute ``_isa_state``)."""

    def __init__(self, transformer, family: "FamilyAdapter", provider: Optional[LayoutProvider], original: Dict[str, Any]):
        self.family = family
        self.provider = provider
        self.original_processors = original  # attn_processors dict before apply
        self.processors: "OrderedDict[str, ISAAttnProcessorBase]" = OrderedDict()
        self.context: Optional[CallContext] = None
        self.call_index = 0
        self.handles: List[Any] = []
        self.installed_by_observe = False
        self._transformer_ref = weakref.ref(transformer)
        self._signature = None
        self.bucketed = None  # (profile, [configs per timestep bucket]) for timestep-bucketed profiles
        self._bucket = 0
        self.profile = None  # the threshold profile applied, if any (warns on calls of another size)
        self._sizes_checked: set = set()

    def check_size(self, layout: Layout) -> None:
        """Warn once per (target, context) token count that differs from the profile's calibrated one."""
        key = (layout.num("target"), layout.num("context"))
        if key not in self._sizes_checked:
            self._sizes_checked.add(key)
            self.profile.check_tokens(*key)

    # --------------------------------------------------------------- hooks
    def _bind(self, module, args, kwargs) -> Dict[str, Any]:
        if self._signature is None:
            try:
                self._signature = inspect.signature(module.forward)
            except (TypeError, ValueError):  # pragma: no cover - exotic forwards
                self._signature = False
        if self._signature is False:
            return dict(kwargs)
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError:
            return dict(kwargs)
        return dict(bound.arguments)

    def pre_hook(self, module, args, kwargs):
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False) and not getattr(self, "_warned_ckpt", False):
            logger.warning(
                "ISA on a transformer with gradient checkpointing: blocks recomputed in the backward pass run outside "
                "the forward's call context (dense attention), so gradients do not match the forward; ISA is meant for "
                "inference (torch.no_grad)"
            )
            self._warned_ckpt = True
        arguments = self._bind(module, args, kwargs)
        ts = arguments.get("timestep")
        step = StepInfo(timestep=ts if isinstance(ts, torch.Tensor) else None, call_index=self.call_index, arguments=arguments)
        self.call_index += 1
        layout = None
        if self.provider is not None:
            try:
                layout = self.provider(module, arguments)
            except Exception as exc:  # a provider bug must not break generation; counted as unknown layout
                logger.warning("ISA layout provider %r failed (%s); this call runs dense attention", self.provider, exc)
                layout = None
        self.context = CallContext(layout=layout, step=step)
        if self.bucketed is not None:
            self._select_bucket(ts)
        return None

    def _select_bucket(self, ts) -> None:
        profile, buckets = self.bucketed
        t = _scalar_timestep(ts)
        b = self._bucket if t is None else profile.bucket_of(t)
        if t is None:
            logger.warning("timestep-bucketed ISA profile but the call has no timestep; keeping bucket %d", b)
        if b != self._bucket or not getattr(self, "_bucket_set", False):
            for n, p in self.processors.items():
                p.config = buckets[b][n]
            self._bucket, self._bucket_set = b, True

    def post_hook(self, module, args, kwargs, output):
        self.context = None
        return None


# ----------------------------------------------------------------------------- processors
class ISAAttnProcessorBase:
    """Base of the ISA processors: eligibility, observation, counting, and the attention call.

    Subclasses reproduce a stock diffusers processor and call :meth:`_attend` where the stock code calls
    ``dispatch_attention_fn``. They can be used directly with ``transformer.set_attn_processor`` (then give
    ``layout=``, since no per-call context is installed), or through :func:`apply_isa`.

    Args:
        config: the layer's :class:`ISAConfig`, or None to leave the layer dense.
        layout: a :class:`Layout` or a callable ``seq_len -> Layout`` used when no per-call context
            provides one.
        layer_name: name used in :func:`stats` and passed to the observer.
        original: the stock processor this one replaces (used for calls it does not serve).

    Attributes (plain, not buffers): ``config``, ``layout``, ``layer_name``, ``original``, ``observer``,
    ``force_dense``, ``stats`` (:class:`LayerStats`), ``state`` (:class:`ISAState` or None).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        config: Optional[ISAConfig] = None,
        *,
        layout: Union[Layout, Callable[[int], Layout], None] = None,
        layer_name: str = "",
        original: Any = None,
    ):
        if config is not None and not isinstance(config, ISAConfig):
            raise TypeError(f"config must be an ISAConfig or None, got {type(config).__name__}")
        self.config = config
        self.layout = layout
        self.layer_name = layer_name
        self.original = original
        self.observer: Optional[Observer] = None
        self.force_dense = False
        self.stats = LayerStats()
        self.state: Optional[ISAState] = None
        if original is not None:
            # keep the stock processor's backend / parallel settings
            if getattr(original, "_attention_backend", None) is not None:
                self._attention_backend = original._attention_backend
            if getattr(original, "_parallel_config", None) is not None:
                self._parallel_config = original._parallel_config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r}, config={self.config!r})"

    # ------------------------------------------------------------ helpers for subclasses
    def _count_isa(self, backend: str) -> None:
        self.stats.isa_calls += 1
        self.stats.backends[backend] += 1

    def _count_fallback(self, reason: str) -> None:
        self.stats.fallbacks[reason] += 1

    def _delegate(self, reason: str, *args, **kwargs):
        """Run the stock processor object for a call this processor does not serve."""
        self._count_fallback(reason)
        original = self.original
        if original is None:
            raise RuntimeError(
                f"{type(self).__name__} ({self.layer_name or 'unnamed layer'}) got a call it cannot serve ({reason}) "
                "and has no stock processor to hand it to; install it through isa_plugin.apply_isa or pass original="
            )
        return original(*args, **kwargs)

    def _step(self) -> StepInfo:
        ctx = self.state.context if self.state is not None else None
        return ctx.step if ctx is not None else StepInfo()

    def _resolve_layout(self, seq_len: int) -> Optional[Layout]:
        ctx = self.state.context if self.state is not None else None
        if ctx is not None and ctx.layout is not None:
            return ctx.layout_for(seq_len)
        if self.layout is None:
            return None
        if isinstance(self.layout, Layout):
            return self.layout
        return _call_layout(self.layout, seq_len)

    def _why_dense(self, q: torch.Tensor, layout: Optional[Layout], attention_mask, parallel_config) -> Optional[str]:
        if self.force_dense:
            return "dense mode"
        if self.config is None:
            return "layer left dense (no config)"
        if parallel_config is not None:
            return "context parallel active"
        if attention_mask is not None:
            return "attention mask present"
        if layout is None:
            return "layout unknown"
        N = q.shape[1]
        if layout.num_tokens != N:
            return f"layout covers {layout.num_tokens} tokens, call has {N}"
        if layout.num("context") == 0:
            return "no context tokens (not an in-context call)"
        if q.dtype not in _FLOAT_DTYPES:
            return f"dtype {q.dtype} not supported"
        D = q.shape[-1]
        if D % 8 != 0 or D > MAX_HEAD_DIM:
            return f"head_dim={D} not supported (multiples of 8 up to {MAX_HEAD_DIM})"
        if layout.num_blocks(self.config.block_size) < 2:
            return "sequence too short (fewer than two blocks)"
        if self.config.num_heads not in (None, q.shape[2]):
            return f"per-head ratios for {self.config.num_heads} heads, call has {q.shape[2]}"
        # CPU with backend "auto" runs the PyTorch reference; elsewhere the kernels must serve the call (the
        # reference at video lengths on an accelerator would be far slower than dense attention)
        if self.config.backend == "triton" or (self.config.backend == "auto" and q.device.type != "cpu"):
            from ..kernels import dispatch

            why = dispatch.triton_ineligible(q, self.config)
            if why is not None:
                return f"ISA kernels unavailable: {why}"
        return None

    def _dispatch_dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """The stock attention call as a zero-argument callable (for :meth:`_attend`'s ``dense``):
        diffusers' ``dispatch_attention_fn`` with this processor's backend and parallel config."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        return dense

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense: Callable[[], torch.Tensor],
        *,
        attention_mask: Optional[torch.Tensor] = None,
        parallel_config: Any = None,
        layout: Optional[Layout] = None,
    ) -> torch.Tensor:
        """ISA or the stock dense attention for q, k, v in [B, N, H, D]; returns [B, N, H, D].

        Args:
            dense: zero-argument callable running the model's own attention call
                (``dispatch_attention_fn`` with the stock arguments).
            attention_mask, parallel_config: what the stock call would pass (a mask or context
                parallelism makes the call dense).
            layout: the call's layout when the processor itself knows it (e.g. from a text length it
                sees); default: the per-call context, then ``self.layout``.
        """
        if layout is None:
            layout = self._resolve_layout(q.shape[1])
        if self.observer is not None:
            self.observer(self.layer_name, q, k, v, layout, self._step())
        state = self.state
        if layout is not None and state is not None and state.profile is not None and not torch.compiler.is_compiling():
            state.check_size(layout)
        reason = self._why_dense(q, layout, attention_mask, parallel_config)
        if reason is not None:
            self._count_fallback(reason)
            return dense()
        out, info = isa_attention(q, k, v, layout, self.config, return_info=True)
        if info.used_isa:
            self._count_isa(info.backend)
        else:
            self._count_fallback(info.reason or "dense")
        return out


# ----------------------------------------------------------------------------- registry
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
    """Layout rules of one pipeline family, for pipelines whose transformer call does not reveal them.

    Subclasses set :attr:`name`, :attr:`pipeline_classes` (class names, matched along the MRO) and
    implement :meth:`layout_provider`.
    """

    name: str = ""
    pipeline_classes: Tuple[str, ...] = ()

    def layout_provider(self, pipe: Any, component: str) -> Optional[LayoutProvider]:
        """A provider for the transformer ``getattr(pipe, component)`` (None: use the family's inference)."""
        raise NotImplementedError

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
        if prev is not None and type(prev) is not type(adapter):
            raise ValueError(f"pipeline class {cls_name} is already served by {prev!r}")
        _PIPELINES[cls_name] = adapter
    return adapter


def load_adapter_modules() -> List[str]:
    """Import every family module of ``isa_plugin.adapters`` (each registers itself); returns their names."""
    global _LOADED
    from . import __name__ as pkg_name, __path__ as pkg_path

    names = sorted(m.name for m in pkgutil.iter_modules(pkg_path) if m.name != "base" and not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{pkg_name}.{name}")
    _LOADED = True
    return names


def _ensure_loaded() -> None:
    if not _LOADED:
        load_adapter_modules()


def registered_families() -> Dict[str, FamilyAdapter]:
    """Transformer class name -> :class:`FamilyAdapter`, for every registered family."""
    _ensure_loaded()
    return dict(_FAMILIES)


def registered_pipelines() -> Dict[str, PipelineAdapter]:
    """Pipeline class name -> :class:`PipelineAdapter`, for every registered pipeline adapter."""
    _ensure_loaded()
    return dict(_PIPELINES)


def _lookup(obj, table):
    for cls in type(obj).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def family_for(transformer: torch.nn.Module) -> FamilyAdapter:
    """The :class:`FamilyAdapter` serving ``transformer``.

    Raises:
        TypeError: the class is not supported (the message lists the supported classes).
    """
    _ensure_loaded()
    fam = _lookup(transformer, _FAMILIES)
    if fam is None:
        raise TypeError(
            f"{type(transformer).__name__} is not supported by isa_plugin; supported transformer classes: "
            f"{sorted(_FAMILIES)}"
        )
    return fam


# ----------------------------------------------------------------------------- apply / remove
def _is_compiled(model: torch.nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover
        OptimizedModule = ()
    if OptimizedModule and isinstance(model, OptimizedModule):
        return True
    for m in model.modules():
        if (OptimizedModule and isinstance(m, OptimizedModule)) or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


def _targets(obj) -> Tuple[Any, List[Tuple[Optional[str], torch.nn.Module]]]:
    """(pipeline or None, [(component name or None, transformer)]) for a pipeline or a transformer."""
    _ensure_loaded()
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover
        OptimizedModule = ()
    if isinstance(obj, torch.nn.Module):
        return None, [(None, obj)]
    components = getattr(obj, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(
            f"expected a diffusers pipeline or a transformer (torch.nn.Module), got {type(obj).__name__}"
        )
    found = []
    for name, comp in components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        inner = comp._orig_mod if (OptimizedModule and isinstance(comp, OptimizedModule)) else comp
        if _lookup(inner, _FAMILIES) is not None:
            found.append((name, comp))
    if not found:
        mods = sorted(f"{n}: {type(c).__name__}" for n, c in components.items() if isinstance(c, torch.nn.Module))
        raise TypeError(
            f"{type(obj).__name__} has no supported transformer ({', '.join(mods) or 'no modules'}); "
            f"supported transformer classes: {sorted(_FAMILIES)}"
        )
    return obj, found


def _check_mapping(mapping, what: str, transformer, layer_names: List[str]) -> Dict[str, Optional[ISAConfig]]:
    keys = set(mapping)
    unknown = sorted(keys - set(layer_names))
    missing = [n for n in layer_names if n not in keys]
    if unknown or missing:
        raise ValueError(
            f"{what} does not match {type(transformer).__name__}: "
            + (f"unknown layers {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; " if unknown else "")
            + (f"missing layers {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + f"the model's ISA layers are {layer_names[0]} ... {layer_names[-1]} ({len(layer_names)} layers). "
            "Was it made for another model or configuration?"
        )
    out = {}
    for n in layer_names:
        c = mapping[n]
        if c is not None and not isinstance(c, ISAConfig):
            raise TypeError(f"{what}: layer {n} maps to {type(c).__name__}; expected an ISAConfig or None (dense)")
        out[n] = c
    return out


def _bucket_timesteps(profile) -> List[float]:
    """One representative timestep per bucket of a timestep-bucketed profile."""
    edges = [float(e) for e in getattr(profile, "timestep_edges", [])]
    return [edges[0] - 1.0] + edges


def _per_layer_configs(config_or_profile, transformer, layer_names: List[str]) -> Tuple[List[Dict[str, Optional[ISAConfig]]], Any]:
    """Per-bucket lists of ``{layer: ISAConfig | None}`` and the profile (None unless bucketed)."""
    if isinstance(config_or_profile, ISAConfig):
        return [{n: config_or_profile for n in layer_names}], None
    if hasattr(config_or_profile, "configs_for") and hasattr(config_or_profile, "check_compatible"):
        profile = config_or_profile
        profile.check_compatible(transformer)
        what = f"profile {type(profile).__name__}"
        if getattr(profile, "num_buckets", 1) > 1 and hasattr(profile, "bucket_of"):
            per_bucket = [_check_mapping(profile.configs_for(transformer, timestep=t), what, transformer, layer_names) for t in _bucket_timesteps(profile)]
            return per_bucket, profile
        return [_check_mapping(profile.configs_for(transformer), what, transformer, layer_names)], None
    if isinstance(config_or_profile, Mapping):
        return [_check_mapping(config_or_profile, "the config mapping", transformer, layer_names)], None
    raise TypeError(
        "config_or_profile must be an ISAConfig, a mapping layer name -> ISAConfig (or None), or a threshold "
        f"profile (with configs_for / check_compatible); got {type(config_or_profile).__name__}"
    )


def _scalar_timestep(ts) -> Optional[float]:
    if not isinstance(ts, torch.Tensor) or ts.numel() == 0:
        return None if not isinstance(ts, (int, float)) else float(ts)
    if ts.ndim <= 1:
        return float(ts.flatten()[0])
    return float(ts[0].max())  # per-token timesteps: the noisy tokens' value


def _user_provider(layout) -> Optional[LayoutProvider]:
    if layout is None:
        return None
    if isinstance(layout, LayoutProvider):
        return layout
    if isinstance(layout, Layout) or callable(layout):
        return _StaticLayout(layout)
    raise TypeError(f"layout must be a Layout, a LayoutProvider or a callable seq_len -> Layout; got {type(layout).__name__}")


def _attn_processors(transformer) -> Dict[str, Any]:
    """``transformer.attn_processors``, or the same walk for models without diffusers' ``AttentionMixin``
    (``HunyuanVideoFramepackTransformer3DModel`` has no ``attn_processors`` / ``set_attn_processor``)."""
    if hasattr(type(transformer), "attn_processors"):
        return transformer.attn_processors
    return {f"{n}.processor": m.get_processor() for n, m in transformer.named_modules() if hasattr(m, "get_processor")}


def _set_attn_processors(transformer, processors: Dict[str, Any]) -> None:
    """``transformer.set_attn_processor(processors)``, or per-module ``set_processor`` without ``AttentionMixin``."""
    if hasattr(type(transformer), "set_attn_processor"):
        transformer.set_attn_processor(processors)
        return
    for n, m in transformer.named_modules():
        key = f"{n}.processor"
        if hasattr(m, "set_processor") and key in processors:
            m.set_processor(processors[key])


def _install(transformer, config_or_profile, provider, *, observe_only: bool = False) -> ISAState:
    if getattr(transformer, _STATE_ATTR, None) is not None:
        raise RuntimeError(
            f"ISA is already applied to this {type(transformer).__name__}; call isa_plugin.remove_isa first to change it"
        )
    if _is_compiled(transformer):
        raise RuntimeError(
            f"this {type(transformer).__name__} is already compiled with torch.compile; apply_isa must be called "
            "before compiling (apply_isa(...), then torch.compile / compile_repeated_blocks)"
        )
    family = family_for(transformer)
    layers = family.self_attention_layers(transformer)
    if not layers:
        raise RuntimeError(
            f"no attention layer of this {type(transformer).__name__} matched the {family.name} adapter; nothing to "
            "apply ISA to"
        )
    names = list(layers)
    if observe_only:
        buckets, profile = [{n: None for n in names}], None
    else:
        buckets, profile = _per_layer_configs(config_or_profile, transformer, names)
    for configs in buckets:
        for n, c in configs.items():
            if c is not None:
                c.per_head(layers[n].heads)  # per-head ratios must fit the layer (raises ValueError)
    configs = buckets[0]
    original = _attn_processors(transformer)
    state = ISAState(transformer, family, provider, dict(original))
    if profile is not None:
        state.bucketed = (profile, buckets)
    if hasattr(config_or_profile, "check_tokens"):
        state.profile = config_or_profile
    new = {}
    key_of = {f"{n}.processor": n for n in names}
    for key, proc in original.items():
        n = key_of.get(key)
        if n is None:
            new[key] = proc
            continue
        expected = getattr(family, "stock_processor_names", None)
        if expected and type(proc).__name__ not in expected:
            raise TypeError(
                f"layer {n} runs {type(proc).__name__}, not the stock processor ({', '.join(expected)}); ISA replaces "
                "only the stock processor (remove the other attention plugin first)"
            )
        p = family.make_processor(n, layers[n], configs[n], proc)
        p.state = state
        state.processors[n] = p
        new[key] = p
    missing = [n for n in names if n not in state.processors]
    if missing:  # pragma: no cover - adapter bug
        raise RuntimeError(f"{family.name} adapter selected layers without processors: {missing[:5]}")
    _set_attn_processors(transformer, new)
    state.handles.append(transformer.register_forward_pre_hook(state.pre_hook, with_kwargs=True))
    state.handles.append(transformer.register_forward_hook(state.post_hook, with_kwargs=True, always_call=True))
    setattr(transformer, _STATE_ATTR, state)
    return state


def _layout_provider_for(pipe, component, transformer, layout) -> Optional[LayoutProvider]:
    family = family_for(transformer)
    chain: List[LayoutProvider] = []
    user = _user_provider(layout)
    if user is not None:
        return user
    if pipe is not None:
        padapter = _lookup(pipe, _PIPELINES)
        if padapter is not None:
            p = padapter.layout_provider(pipe, component)
            if p is not None:
                chain.append(p)
    chain.append(_FamilyLayout(family))
    return chain[0] if len(chain) == 1 else _ChainedLayout(chain)


class _FamilyLayout(LayoutProvider):
    def __init__(self, family: FamilyAdapter):
        self.family = family

    def __call__(self, transformer, arguments):
        return self.family.layout_for_call(transformer, arguments)

    def __repr__(self):
        return f"_FamilyLayout({self.family.name!r})"


def _inner(module):
    return getattr(module, "_orig_mod", module)


def apply_isa(pipe_or_transformer, config_or_profile, *, layout: Optional[LayoutSpec] = None):
    """Install ISA processors on the self-attention layers of a pipeline's transformer(s) or a transformer.

    Args:
        pipe_or_transformer: a diffusers pipeline (every supported transformer component is served) or a
            supported transformer (see :func:`registered_families`).
        config_or_profile: an :class:`~isa_plugin.ISAConfig` (same ratios on every layer), a mapping layer
            name -> ISAConfig or None (None leaves the layer dense; the keys must be exactly the model's ISA
            layers, e.g. ``"blocks.0.attn1"``), or a threshold profile (an object with
            ``check_compatible(transformer)`` and ``configs_for(transformer)``).
        layout: overrides the adapters: a :class:`~isa_plugin.Layout` for every call, a callable
            ``seq_len -> Layout``, or a :class:`LayoutProvider` (e.g. ``WanICLLayout(context_frames=21)``).

    Returns:
        ``pipe_or_transformer`` (modified in place).

    Raises:
        TypeError: unsupported transformer / pipeline (lists the supported classes), bad argument types.
        RuntimeError: ISA already applied, the model is already compiled (apply before compiling), or no
            attention layer matched.
        ValueError: a mapping or profile whose layers do not match the model, or per-head ratios whose
            length differs from the layer's head count.

    Example:
        >>> pipe = WanInContextEditPipeline.from_pretrained(path)
        >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig())
        >>> video = pipe(prompt, video=source_frames).frames[0]
        >>> isa_plugin.stats(pipe)["blocks.0.attn1"]
        {'isa_calls': 100, 'fallbacks': 0, 'reasons': {}}
    """
    pipe, targets = _targets(pipe_or_transformer)
    if isinstance(config_or_profile, Mapping) and len(targets) > 1:
        raise ValueError(
            f"{type(pipe).__name__} has {len(targets)} transformers ({[n for n, _ in targets]}); a per-layer mapping is "
            "ambiguous, apply_isa to each transformer separately"
        )
    done = []
    try:
        for component, module in targets:
            transformer = module
            if getattr(module, "_orig_mod", None) is not None:
                raise RuntimeError(
                    f"{component or 'the transformer'} is already compiled with torch.compile; apply_isa must be "
                    "called before compiling"
                )
            provider = _layout_provider_for(pipe, component, transformer, layout)
            _install(transformer, config_or_profile, provider)
            done.append(transformer)
    except Exception:
        for t in done:
            _uninstall(t)
        raise
    return pipe_or_transformer


def _uninstall(transformer) -> None:
    state: ISAState = getattr(transformer, _STATE_ATTR)
    for h in state.handles:
        h.remove()
    _set_attn_processors(transformer, dict(state.original_processors))
    for p in state.processors.values():
        p.state = None
    state.context = None
    delattr(transformer, _STATE_ATTR)


def _applied(pipe_or_transformer) -> List[Tuple[Optional[str], torch.nn.Module]]:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [(None, pipe_or_transformer)] if getattr(pipe_or_transformer, _STATE_ATTR, None) is not None else []
    components = getattr(pipe_or_transformer, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"expected a diffusers pipeline or a transformer, got {type(pipe_or_transformer).__name__}")
    return [(n, c) for n, c in components.items() if isinstance(c, torch.nn.Module) and getattr(_inner(c), _STATE_ATTR, None) is not None]


def is_isa_applied(pipe_or_transformer) -> bool:
    """True when :func:`apply_isa` is in effect on the transformer (or any transformer of the pipeline)."""
    return bool(_applied(pipe_or_transformer))


def remove_isa(pipe_or_transformer) -> None:
    """Restore the original attention processors (the same objects) and remove the hooks.

    Raises:
        ValueError: ISA is not applied.

    Example:
        >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig()); isa_plugin.remove_isa(pipe)
    """
    applied = _applied(pipe_or_transformer)
    if not applied:
        raise ValueError(f"ISA is not applied to this {type(pipe_or_transformer).__name__}; nothing to remove")
    for _, t in applied:
        _uninstall(_inner(t))


def isa_processors(pipe_or_transformer) -> "OrderedDict[str, ISAAttnProcessorBase]":
    """Layer name -> installed ISA processor (names prefixed ``"<component>/"`` for a pipeline's extra transformers)."""
    out = OrderedDict()
    for comp, t in _applied(pipe_or_transformer):
        prefix = "" if comp in (None, "transformer") else f"{comp}/"
        for n, p in getattr(_inner(t), _STATE_ATTR).processors.items():
            out[prefix + n] = p
    return out


def stats(pipe_or_transformer) -> Dict[str, Dict[str, Any]]:
    """Per layer: ISA calls, dense fallbacks and their reasons since apply (or the last :func:`reset_stats`).

    Returns:
        ``{layer_name: {"isa_calls": int, "fallbacks": int, "reasons": {reason: count},
        "backends": {"triton" | "reference": count}}}`` (``backends`` says which implementation served
        the ISA calls). For a pipeline
        with several transformers, layers of components other than ``transformer`` are prefixed
        ``"<component>/"`` (e.g. ``"transformer_2/blocks.0.attn1"``).

    Raises:
        ValueError: ISA is not applied.

    Example:
        >>> isa_plugin.stats(pipe)["blocks.3.attn1"]
        {'isa_calls': 8, 'fallbacks': 0, 'reasons': {}, 'backends': {'triton': 8}}
    """
    procs = isa_processors(pipe_or_transformer)
    if not procs:
        raise ValueError(f"ISA is not applied to this {type(pipe_or_transformer).__name__}; no statistics")
    return {n: p.stats.as_dict() for n, p in procs.items()}


def reset_stats(pipe_or_transformer) -> None:
    """Zero the counters of :func:`stats` and the call index of :class:`StepInfo`."""
    for _, t in _applied(pipe_or_transformer):
        state = getattr(_inner(t), _STATE_ATTR)
        state.call_index = 0
        for p in state.processors.values():
            p.stats = LayerStats()


@contextlib.contextmanager
def observe_attention(pipe_or_transformer, observer: Observer, *, dense: bool = True, layout: Optional[LayoutSpec] = None) -> Iterator[Dict[str, ISAAttnProcessorBase]]:
    """Observe q, k, v of every ISA layer during the ``with`` block (the calibration hook).

    On a model without ISA, processors are installed in dense mode for the duration (the model computes
    exactly its stock attention) with the layouts the adapters give (``layout`` overrides them, as in
    :func:`apply_isa`). On a model with ISA applied, its processors get ``observer`` and, when ``dense``,
    compute dense attention for the duration.

    Args:
        observer: ``observer(layer_name, q, k, v, layout, step_info)``; q, k, v are [B, N, H, D] after norms
            and RoPE; ``layout`` is the call's Layout or None; ``step_info`` a :class:`StepInfo`.
        dense: compute the stock dense attention while observing (default). False keeps ISA running
            (only meaningful on a model with ISA applied).

    Yields:
        layer name -> processor.

    Example:
        >>> seen = []
        >>> with observe_attention(pipe, lambda name, q, k, v, layout, step: seen.append((name, q.shape))):
        ...     pipe(prompt, video=src, num_inference_steps=2)
    """
    installed = []
    if not is_isa_applied(pipe_or_transformer):
        pipe, targets = _targets(pipe_or_transformer)
        try:
            for component, t in targets:
                provider = _layout_provider_for(pipe, component, t, layout)
                state = _install(t, None, provider, observe_only=True)
                state.installed_by_observe = True
                installed.append(t)
        except Exception:
            for t in installed:
                _uninstall(t)
            raise
    elif layout is not None:
        raise ValueError("layout= is only used when observe_attention installs the processors; ISA is already applied")
    procs = isa_processors(pipe_or_transformer)
    saved = {n: (p.observer, p.force_dense) for n, p in procs.items()}
    try:
        for p in procs.values():
            p.observer = observer
            p.force_dense = dense
        yield procs
    finally:
        for n, p in procs.items():
            p.observer, p.force_dense = saved[n]
        for t in installed:
            _uninstall(t)
