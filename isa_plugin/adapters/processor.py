"""The ISA processor base: per-layer counters, eligibility, observation and the attention call.

Family processors (``families/*.py``) subclass :class:`ISAAttnProcessorBase`, reproduce one stock
diffusers processor exactly and call :meth:`ISAAttnProcessorBase.attend` (or :func:`attend_with_key_mask`,
for a call with a key-padding mask) where the stock code calls ``dispatch_attention_fn``. The methods
documented here are the extension API that family processors and the helpers of this package
(:mod:`.masking`, :mod:`.parallel`) use; nothing else reaches into a processor.

The attention entry points sit above the helpers: :meth:`ISAAttnProcessorBase.attend` and
:func:`attend_with_key_mask` send a context-parallel call to :func:`~isa_plugin.adapters.parallel.ulysses_attend`
and any other call to the whole-sequence paths (:meth:`ISAAttnProcessorBase.attend_local`,
:func:`~isa_plugin.adapters.masking.attend_key_mask_local`), which the Ulysses exchange also runs between its
exchanges. The kernels are reached only through :mod:`isa_plugin.attention`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union

import torch

from ..attention import Route, run_route, select_backend
from ..config import ISAConfig
from ..layout import Layout
from ..plan_reuse import PlanStore
from ..timesteps import timestep_scalar
from .context import StepInfo, call_layout
from .masking import attend_key_mask_local
from .parallel import carry_settings, context_parallel_config, ulysses_attend

if TYPE_CHECKING:  # pragma: no cover
    from .install import ISAState

__all__ = ["ISAAttnProcessorBase", "LayerCounters", "Observer", "attend_with_key_mask"]

logger = logging.getLogger(__name__)

Observer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Optional[Layout], StepInfo], None]


@dataclass
class LayerCounters:
    """Counters of one ISA layer: ISA calls, dense fallbacks by reason, which implementation served ISA, and
    how many ISA calls executed a plan kept from an earlier step (``ISAConfig.plan_reuse``)."""

    isa_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)
    reused_plans: int = 0

    def as_dict(self) -> Dict[str, Any]:
        """``{"isa_calls", "fallbacks" (total), "reasons" {reason: n}, "backends" {name: n}, "reused_plans"}``."""
        return {"isa_calls": self.isa_calls, "fallbacks": sum(self.fallbacks.values()), "reasons": dict(self.fallbacks),
                "backends": dict(self.backends), "reused_plans": self.reused_plans}


class ISAAttnProcessorBase:
    """Base of the ISA processors: eligibility, observation, counting, and the attention call.

    Subclasses reproduce a stock diffusers processor and call :meth:`attend` where the stock code calls
    ``dispatch_attention_fn``. They can be used directly with ``transformer.set_attn_processor`` (then give
    ``layout=``, since no per-call context is installed), or through :func:`isa_plugin.apply_isa`.

    Args:
        config: the layer's :class:`ISAConfig`, or None to leave the layer dense.
        layout: a :class:`Layout` or a callable ``seq_len -> Layout`` used when no per-call context
            provides one.
        layer_name: name used in :func:`isa_plugin.stats` and passed to the observer.
        original: the stock processor this one replaces (used for calls it does not serve).

    Attributes (plain, not buffers): ``config``, ``layout``, ``layer_name``, ``original``, ``observer``,
    ``force_dense``, ``stats`` (:class:`LayerCounters`), ``state`` (the installing ``ISAState`` or None),
    ``plans`` (the layer's :class:`~isa_plugin.plan_reuse.PlanStore`, used when ``config.plan_reuse > 1``;
    calls with a key-padding mask plan every call).

    Context parallelism: diffusers' ``enable_parallelism`` sets ``_parallel_config`` on these processors as on
    its own; :meth:`attend` then runs ISA under Ulysses (:mod:`.parallel`). :attr:`cp_streams` says how a
    rank's call is made of the model's split streams (``"sequence"``; joint-attention families
    ``"text_first"`` or ``"text_last"``).
    """

    _attention_backend = None
    _parallel_config = None
    #: how one rank's attention call is made of the model's split streams (see :mod:`.parallel`)
    cp_streams = "sequence"
    #: block size of a gated coarse residual (``attend(residual_gate=...)``); None: the default of
    #: :func:`~isa_plugin.attention.run_route` (64, LIVEditor's)
    residual_block_size: Optional[int] = None

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
        self.stats = LayerCounters()
        self.plans = PlanStore()
        self.state: Optional["ISAState"] = None
        if original is not None:  # keep the stock processor's backend / parallel settings
            carry_settings(original, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r}, config={self.config!r})"

    # ------------------------------------------------------------ counting
    def reset_counters(self) -> None:
        """Zero :attr:`stats` and drop the plans kept for reuse (:func:`isa_plugin.adapters.reset_stats`)."""
        self.stats = LayerCounters()
        self.plans.clear()

    def record_isa(self, backend: str) -> None:
        """Count one call served by ISA on ``backend`` (``"triton"`` or ``"reference"``)."""
        self.stats.isa_calls += 1
        self.stats.backends[backend] += 1

    def record_fallback(self, reason: str) -> None:
        """Count one call served by the model's dense attention, with its reason."""
        self.stats.fallbacks[reason] += 1

    def delegate(self, reason: str, *args, **kwargs):
        """Run the stock processor object for a call this processor does not serve (counted)."""
        self.record_fallback(reason)
        original = self.original
        if original is None:
            raise RuntimeError(
                f"{type(self).__name__} ({self.layer_name or 'unnamed layer'}) got a call it cannot serve ({reason}) "
                "and has no stock processor to hand it to; install it through isa_plugin.apply_isa or pass original="
            )
        carry_settings(self, original)  # enable_parallelism / set_attention_backend reached only this processor
        return original(*args, **kwargs)

    # ------------------------------------------------------------ per-call context
    def step_info(self) -> StepInfo:
        """The :class:`StepInfo` of the transformer call in progress (empty outside one)."""
        ctx = self.state.context if self.state is not None else None
        return ctx.step if ctx is not None else StepInfo()

    def step_timestep(self) -> Optional[float]:
        """The timestep scalar of the transformer call in progress (None without one, or under
        ``torch.compile``, where plans are not reused)."""
        ts = self.step_info().timestep
        if ts is None or torch.compiler.is_compiling():
            return None
        return timestep_scalar(ts)

    def resolve_layout(self, seq_len: int) -> Optional[Layout]:
        """The layout of an attention call over ``seq_len`` tokens: the per-call context, then ``self.layout``."""
        ctx = self.state.context if self.state is not None else None
        if ctx is not None and ctx.layout is not None:
            return ctx.layout_for(seq_len)
        if self.layout is None:
            return None
        if isinstance(self.layout, Layout):
            return self.layout
        return call_layout(self.layout, seq_len)

    def observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[Layout]) -> None:
        """Hand q, k, v ([B, N, H, D], after norms and RoPE) to the observer, if any; check the profile's size."""
        if self.observer is not None:
            self.observer(self.layer_name, q, k, v, layout, self.step_info())
        state = self.state
        if layout is not None and state is not None and state.profile is not None and not torch.compiler.is_compiling():
            state.check_size(layout)

    # ------------------------------------------------------------ eligibility (decided once per call)
    def layer_reason(self) -> Optional[str]:
        """Why this layer runs dense whatever the call (dense mode, no config); None when it may run ISA."""
        if self.force_dense:
            return "dense mode"
        if self.config is None:
            return "layer left dense (no config)"
        return None

    def why_dense(self, q: torch.Tensor, layout: Optional[Layout], attention_mask=None,
                  config: Optional[ISAConfig] = None) -> Optional[str]:
        """Why this layer cannot run ISA for the call (None: it can). Layer and call checks only; the backend
        (kernels, reference or dense) is decided by :meth:`route`. ``config``: the config of the call's heads
        (default ``self.config``; under context parallelism, the slice for the rank's heads)."""
        reason = self.layer_reason()
        if reason is not None:
            return reason
        config = config or self.config
        if attention_mask is not None:
            return "attention mask present"
        if layout is None:
            return "layout unknown"
        N = q.shape[1]
        if layout.num_tokens != N:
            return f"layout covers {layout.num_tokens} tokens, call has {N}"
        if layout.num("context") == 0:
            return "no context tokens (not an in-context call)"
        if config.num_heads not in (None, q.shape[2]):
            return f"per-head ratios for {config.num_heads} heads, call has {q.shape[2]}"
        return None

    def route(self, q: torch.Tensor, layout: Optional[Layout], attention_mask=None, config: Optional[ISAConfig] = None) -> Route:
        """The call's one backend decision: a :class:`~isa_plugin.attention.Route` (``"dense"`` with the
        reason when the layer or the backends cannot serve it). ``config`` as in :meth:`why_dense`."""
        reason = self.why_dense(q, layout, attention_mask, config)
        if reason is not None:
            return Route("dense", reason)
        return select_backend(q, layout, config or self.config, in_model=True)

    # ------------------------------------------------------------ attention
    def dense_call(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """The stock attention call as a zero-argument callable: diffusers' ``dispatch_attention_fn`` with this
        processor's backend and parallel config (q, k, v: this rank's shards under context parallelism)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        return dense

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        dense: Optional[Callable[[], torch.Tensor]] = None,
        layout: Optional[Layout] = None,
        residual_gate: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """ISA or the stock dense attention for q, k, v in [B, N, H, D]; returns [B, N, H, D].

        Args:
            attention_mask: what the stock call would pass (a mask makes the call dense).
            dense: zero-argument callable running the model's own attention call; default
                :meth:`dense_call` with q, k, v and the mask.
            layout: the call's layout when the processor itself knows it (e.g. from a text length it
                sees); default: :meth:`resolve_layout`. Under context parallelism: the whole sequence's.
            residual_gate: [B, N] or [B, N, 1] for models trained with a gated coarse residual
                (LIVEditor): ``gate · coarse`` (over :attr:`residual_block_size` blocks, through
                :func:`~isa_plugin.attention.run_route`) is added to the output of either path. None (stock
                models): nothing is added.

        Under context parallelism (``_parallel_config`` set by ``enable_parallelism``) q, k, v, the gate and the
        result are this rank's sequence shard and the call goes through
        :func:`~isa_plugin.adapters.parallel.ulysses_attend`; after Ulysses' exchange each rank holds the whole
        sequence for its heads, so the gated residual runs there (the gate gathered once per call).

        Raises:
            RuntimeError: a ``residual_gate`` under context parallelism that cannot give one rank every token
                of its heads (ring attention; see :func:`~isa_plugin.adapters.parallel.ulysses_attend`).
        """
        if context_parallel_config(self) is not None:
            return ulysses_attend(self, q, k, v, attention_mask=attention_mask, dense=dense, layout=layout,
                                  residual_gate=residual_gate)
        return self.attend_local(q, k, v, attention_mask=attention_mask, dense=dense, layout=layout,
                                 residual_gate=residual_gate)

    def attend_local(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        dense: Optional[Callable[[], torch.Tensor]] = None,
        layout: Optional[Layout] = None,
        residual_gate: Optional[torch.Tensor] = None,
        config: Optional[ISAConfig] = None,
    ) -> torch.Tensor:
        """:meth:`attend` on tensors that hold the whole sequence (no exchange): observe, route, run
        (:func:`~isa_plugin.attention.run_route`, which also adds the ``residual_gate`` residual).

        ``config``: the config of the heads in q (default ``self.config``; the rank's slice under Ulysses).
        """
        if layout is None:
            layout = self.resolve_layout(q.shape[1])
        self.observe(q, k, v, layout)
        route = self.route(q, layout, attention_mask, config)
        if route.backend == "dense":
            self.record_fallback(route.reason)
            dense = dense or self.dense_call(q, k, v, attention_mask)
        config = config or self.config
        # the step's timestep is read (a host synchronisation on CUDA) only for layers that reuse plans
        reuse = route.backend != "dense" and config.plan_reuse > 1
        reused = self.plans.reused
        out = run_route(q, k, v, layout, config, route, dense=dense, residual_gate=residual_gate,
                        residual_block_size=self.residual_block_size, plans=self.plans if reuse else None,
                        timestep=self.step_timestep() if reuse else None)
        if route.backend != "dense":
            self.record_isa(route.backend)
            self.stats.reused_plans += self.plans.reused - reused
        return out


def attend_with_key_mask(
    proc: ISAAttnProcessorBase,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    *,
    attention_mask: Optional[torch.Tensor] = None,
    dense: Optional[Callable[[], torch.Tensor]] = None,
    mask_source: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ISA for a call whose stock attention masks some keys (a key-padding mask), or the stock dense path.

    Joint-attention models (QwenImage, HunyuanVideo-Framepack) mask padded text keys; ISA honours such a mask
    when every masked key is a text token (:mod:`.masking`).

    Args:
        proc: the calling processor (its config, layout, counters and observer are used).
        q, k, v: [B, N, H, D] after norms and RoPE.
        key_valid: [B, N] bool, True for keys every query may attend (None: no mask).
        attention_mask: the mask the stock attention call gets (its dense path runs with it).
        dense: zero-argument callable running the model's own masked attention (default
            ``proc.dense_call(q, k, v, attention_mask)``).
        mask_source: the transformer-level mask ``key_valid`` derives from (same object for every layer of
            a call); when given, the mask analysis is cached for the rest of the transformer call.

    Returns:
        [B, N, H, D]. Without a mask, or with an all-True one, this is ``proc.attend``. Otherwise, when
        every masked key is a text token, each batch entry runs ISA over its unmasked tokens and its masked
        queries attend densely to its unmasked keys. Masks on other tokens fall back to ``dense()`` with the
        reason ``"attention mask on non-text tokens"``. The observer, if any, sees the unmasked q, k, v and
        the full layout.

        Under context parallelism q, k, v, ``key_valid`` and the result are this rank's sequence shard: the
        mask is gathered like the tokens (:func:`~isa_plugin.adapters.parallel.ulysses_attend`).

    Example:
        >>> out = attend_with_key_mask(self, query, key, value, key_valid, attention_mask=mask, mask_source=text_mask)
    """
    if context_parallel_config(proc) is not None:
        if key_valid is not None and attention_mask is None:
            attention_mask = key_valid[:, None, None, :]
        return ulysses_attend(proc, q, k, v, attention_mask=attention_mask, dense=dense, key_valid=key_valid)
    return attend_key_mask_local(proc, q, k, v, key_valid, attention_mask=attention_mask, dense=dense, mask_source=mask_source)
