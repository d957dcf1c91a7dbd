"""Installing ISA on a model: :func:`apply_isa`, :func:`remove_isa`, :func:`stats`, :func:`observe_attention`.

:func:`apply_isa` installs, per instance, one processor per selected layer through
``transformer.set_attn_processor(dict)`` (all other entries are passed back unchanged), and registers a
forward pre-hook (``with_kwargs=True``) plus an always-called forward hook on the transformer. The pre-hook
binds the forward arguments, computes a :class:`~isa_plugin.adapters.context.CallContext` (the layout, or
a function of the sequence length giving it, and a :class:`~isa_plugin.adapters.context.StepInfo`) and
stores it on the shared :class:`ISAState`; the post-hook clears it.

Each processor decides per call, once, whether the call runs ISA (on the kernels or the reference) or the
model's own dense attention (``dispatch_attention_fn`` with the processor's backend and parallel config, or
the stock processor object itself for structurally different calls), and counts fallbacks per layer with
their reason; see :func:`stats`.

Observation hook (calibration): every ISA processor has two plain attributes, ``observer`` (None or
``observer(layer_name, q, k, v, layout, step_info)``, called right before the attention call with q, k, v
as the backend would get them, [B, N, H, D] after norms and RoPE) and ``force_dense`` (compute the stock
dense attention, counted with reason ``"dense mode"``, while still observing). :func:`observe_attention`
is the context manager a recorder uses.

Thresholds are plain attributes of the processors; no module buffers or parameters are added, so
``state_dict()`` is unchanged. A profile with timestep buckets is expanded at apply time into one config
set per bucket; the pre-hook switches the processors' ``config`` to the bucket of each call's timestep
(:func:`isa_plugin.timesteps.timestep_scalar` of the transformer's ``timestep`` argument).

A pipeline may install ISA as its default (:mod:`isa_plugin.adapters.defaults`, ``ISAState.default_of``):
:func:`apply_isa`, :class:`~isa_plugin.ISAProcessor` and :func:`observe_attention` replace that installation.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from ..config import ISAConfig
from ..layout import Layout
from ..timesteps import timestep_scalar
from .context import CallContext, ChainedLayout, FamilyLayout, LayoutProvider, LayoutSpec, StepInfo, user_provider
from .parallel import carry_settings
from .processor import ISAAttnProcessorBase, Observer
from .registry import FamilyAdapter, family_for, lookup, registered_families, registered_pipelines

__all__ = ["apply_isa", "remove_isa", "stats", "reset_stats", "observe_attention", "isa_processors", "is_isa_applied",
           "ISAState"]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_isa_state"


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
        self.default_of: Optional[str] = None  # the pipeline whose default ISA this is (adapters.defaults); None: the user's

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
            self._select_bucket(timestep_scalar(ts))

    def _select_bucket(self, t: Optional[float]) -> None:
        profile, buckets = self.bucketed
        b = self._bucket if t is None else profile.bucket_of(t)
        if t is None:
            logger.warning("timestep-bucketed ISA profile but the call has no timestep; keeping bucket %d", b)
        if b != self._bucket or not getattr(self, "_bucket_set", False):
            for n, p in self.processors.items():
                p.config = buckets[b][n]
            self._bucket, self._bucket_set = b, True

    def post_hook(self, module, args, kwargs, output):
        self.context = None


def _optimized_module_class():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover
        return ()
    return OptimizedModule


def _is_compiled(model: torch.nn.Module) -> bool:
    OptimizedModule = _optimized_module_class()
    return any((OptimizedModule and isinstance(m, OptimizedModule)) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _targets(obj) -> Tuple[Any, List[Tuple[Optional[str], torch.nn.Module]]]:
    """(pipeline or None, [(component name or None, transformer)]) for a pipeline or a transformer."""
    OptimizedModule = _optimized_module_class()
    if isinstance(obj, torch.nn.Module):
        return None, [(None, obj)]
    components = getattr(obj, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"expected a diffusers pipeline or a transformer (torch.nn.Module), got {type(obj).__name__}")
    found = []
    for name, comp in components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        inner = comp._orig_mod if (OptimizedModule and isinstance(comp, OptimizedModule)) else comp
        if lookup(inner, registered_families()) is not None:
            found.append((name, comp))
    if not found:
        mods = sorted(f"{n}: {type(c).__name__}" for n, c in components.items() if isinstance(c, torch.nn.Module))
        raise TypeError(
            f"{type(obj).__name__} has no supported transformer ({', '.join(mods) or 'no modules'}); "
            f"supported transformer classes: {sorted(registered_families())}"
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
    state, processors = prepare_install(transformer, config_or_profile, provider, observe_only=observe_only)
    _set_attn_processors(transformer, processors)
    attach_state(transformer, state)
    return state


def prepare_install(transformer, config_or_profile, provider: Optional[LayoutProvider], *,
                    observe_only: bool = False) -> Tuple[ISAState, Dict[str, Any]]:
    """What :func:`apply_isa` decides for one transformer before changing it (guard rails included): the
    :class:`ISAState` to attach (:func:`attach_state`) and the full ``attn_processors`` mapping to install (the
    family's ISA processors; every other entry the processor already there). A pipeline's default ISA is removed
    first (it is replaced). Raises as :func:`apply_isa`."""
    drop_default(transformer)
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
    return state, new


def attach_state(transformer, state: ISAState) -> None:
    """Register ``state``'s forward hooks on ``transformer`` and mark it applied (after its processors are set)."""
    state.handles.append(transformer.register_forward_pre_hook(state.pre_hook, with_kwargs=True))
    state.handles.append(transformer.register_forward_hook(state.post_hook, with_kwargs=True, always_call=True))
    setattr(transformer, _STATE_ATTR, state)


def _layout_provider_for(pipe, component, transformer, layout) -> Optional[LayoutProvider]:
    family = family_for(transformer)
    user = user_provider(layout)
    if user is not None:
        return user
    padapter = lookup(pipe, registered_pipelines()) if pipe is not None else None
    pipeline_provider = padapter.layout_provider(pipe, component) if padapter is not None else None
    chain: List[LayoutProvider] = ([pipeline_provider] if pipeline_provider is not None else []) + [FamilyLayout(family)]
    return chain[0] if len(chain) == 1 else ChainedLayout(chain)


def prepare_transformer(transformer, config_or_profile, *, layout: Optional[LayoutSpec] = None) -> Tuple[ISAState, Dict[str, Any]]:
    """:func:`prepare_install` as ``apply_isa(transformer, config_or_profile, layout=layout)`` makes it for a
    transformer given alone (the family's layout inference, or ``layout``; a profile's own layers)."""
    provider = _layout_provider_for(None, None, transformer, layout)
    part = config_or_profile.for_component(None) if hasattr(config_or_profile, "for_component") else config_or_profile
    return prepare_install(transformer, part, provider)


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
            # a profile calibrated on several transformers holds each one's layers (e.g. Wan 2.2's experts)
            part = config_or_profile.for_component(component) if hasattr(config_or_profile, "for_component") else config_or_profile
            _install(transformer, part, provider)
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
    for p in state.processors.values():  # enable_parallelism / set_attention_backend after apply reached only p
        if p.original is not None:
            carry_settings(p, p.original)
    _set_attn_processors(transformer, dict(state.original_processors))
    for p in state.processors.values():
        p.state = None
    state.context = None
    delattr(transformer, _STATE_ATTR)


def drop_default(transformer) -> None:
    """Remove ISA that a pipeline installed as its default (``ISAState.default_of``); anything else stays."""
    state = getattr(_inner(transformer), _STATE_ATTR, None)
    if state is not None and state.default_of is not None:
        _uninstall(_inner(transformer))


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

    The restored processors get the attention backend and context-parallel config the ISA processors
    hold (set by ``set_attention_backend`` / ``enable_parallelism`` after :func:`apply_isa`), so a model
    made parallel while ISA was applied stays parallel.

    On a model or pipeline without ISA (never applied, or already removed) it does nothing and logs a
    warning, so a cleanup path (``try: ... finally: remove_isa(pipe)``) may call it unconditionally.

    Raises:
        TypeError: neither a diffusers pipeline nor a transformer.

    Example:
        >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig()); isa_plugin.remove_isa(pipe)
    """
    applied = _applied(pipe_or_transformer)
    if not applied:
        logger.warning("remove_isa: ISA is not applied to this %s; nothing to remove", type(pipe_or_transformer).__name__)
        return
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
        "backends": {executor: count}, "reused_plans": int}}`` (the executors that served the ISA calls; how
        many calls ran a plan kept from an earlier step, ``ISAConfig.plan_reuse``). For a pipeline
        with several transformers, layers of components other than ``transformer`` are prefixed
        ``"<component>/"`` (e.g. ``"transformer_2/blocks.0.attn1"``). ``{}`` when ISA is not applied (never,
        or no more after :func:`remove_isa`): there is nothing to count.

        Under context parallelism the counters are per process: on each rank they count the calls of that
        rank's processors, one per layer call whichever heads the rank computed (see
        :mod:`isa_plugin.adapters.parallel`). Ranks take the same decision for a call, so their counts agree.

    Raises:
        TypeError: neither a diffusers pipeline nor a transformer.

    Example:
        >>> isa_plugin.stats(pipe)["blocks.3.attn1"]
        {'isa_calls': 8, 'fallbacks': 0, 'reasons': {}, 'backends': {'triton': 8}, 'reused_plans': 0}
    """
    return {n: p.stats.as_dict() for n, p in isa_processors(pipe_or_transformer).items()}


def reset_stats(pipe_or_transformer) -> None:
    """Zero the counters of :func:`stats` and the call index of :class:`StepInfo`; drop the layers' kept plans."""
    for _, t in _applied(pipe_or_transformer):
        state = getattr(_inner(t), _STATE_ATTR)
        state.call_index = 0
        for p in state.processors.values():
            p.reset_counters()


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
    for _, t in _applied(pipe_or_transformer):  # a pipeline's default ISA is replaced by the observing processors
        drop_default(t)
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
