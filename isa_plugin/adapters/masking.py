"""Key-padding masks under ISA: serve a masked call when the mask only removes text tokens.

Joint-attention models (QwenImage, HunyuanVideo-Framepack) mask padded text keys. ISA honours such a mask
when every masked key is a text token: each batch entry runs ISA over its unmasked tokens (the layout's
text spans shrink by the masked tokens), and the masked queries attend densely to the entry's unmasked
keys, which is exactly the stock masked attention when all ratios are 1. Masks on other tokens run the
stock dense path, counted with the reason ``"attention mask on non-text tokens"``.

This module serves a call whose tensors hold the whole sequence (:func:`attend_key_mask_local`). The
processors' entry point is :func:`isa_plugin.adapters.processor.attend_with_key_mask`, which sends a
context-parallel call through the Ulysses exchange (:mod:`.parallel`), which in turn runs
:func:`attend_key_mask_local` on the gathered sequence. This module imports neither (the processor
type only for annotations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import torch

from ..attention import dense_attention, run_isa
from ..config import ISAConfig
from ..layout import Layout

if TYPE_CHECKING:  # pragma: no cover
    from .processor import ISAAttnProcessorBase

__all__ = ["attend_key_mask_local"]

#: one entry's plan: (indices of unmasked tokens, indices of masked tokens, layout of the unmasked tokens)
EntryPlan = Tuple[torch.Tensor, torch.Tensor, Layout]


def _key_mask_plan(key_valid: torch.Tensor, layout: Layout) -> Tuple[Optional[str], Optional[List[EntryPlan]]]:
    """``(reason, None)`` when ISA cannot honour the mask, ``(None, plan per batch entry)`` otherwise."""
    lengths = torch.tensor([n for _, n in layout.spans])
    is_text = torch.repeat_interleave(torch.tensor([k == "text" for k, _ in layout.spans]), lengths)
    valid = key_valid.detach().to("cpu", torch.bool)
    if bool((~valid & ~is_text).any()):
        return "attention mask on non-text tokens", None
    plan = []
    bounds = torch.tensor([0] + [n for _, n in layout.spans]).cumsum(0).tolist()
    for row in valid:
        spans = []
        for s, (kind, _) in enumerate(layout.spans):
            n = int(row[bounds[s] : bounds[s + 1]].sum())
            if n > 0:
                spans.append((kind, n))
        keep = torch.nonzero(row).flatten()
        drop = torch.nonzero(~row).flatten()
        plan.append((keep, drop, Layout(spans)))
    return None, plan


def _cached_mask_plan(proc: ISAAttnProcessorBase, key_valid: torch.Tensor, layout: Optional[Layout], mask_source, device):
    """``(all_valid, reason, plan)`` for a key mask, computed once per transformer call and mask.

    The per-call context holds the cache (:meth:`~isa_plugin.adapters.context.CallContext.cache`), keyed by
    the identity of ``mask_source`` (the transformer-level mask every layer of the call derives its mask
    from), so the host synchronisation and index building happen once per forward, not once per layer.
    """
    ctx = proc.state.context if proc.state is not None else None
    cache = key = None
    if ctx is not None and mask_source is not None:
        cache = ctx.cache("key_mask_plans")
        key = (id(mask_source), tuple(key_valid.shape), layout, str(device))
        hit = cache.get(key)
        if hit is not None and hit[0] is mask_source:
            return hit[1]
    all_valid = bool(key_valid.all())
    reason, plan = None, None
    if not all_valid and layout is not None and layout.num_tokens == key_valid.shape[1]:
        reason, plan = _key_mask_plan(key_valid, layout)
        if plan is not None:
            plan = [(keep.to(device), drop.to(device), lay) for keep, drop, lay in plan]
    result = (all_valid, reason, plan)
    if cache is not None:
        cache[key] = (mask_source, result)  # holding mask_source keeps its id from being reused
    return result


def attend_key_mask_local(
    proc: ISAAttnProcessorBase,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    *,
    attention_mask: Optional[torch.Tensor] = None,
    dense: Optional[Callable[[], torch.Tensor]] = None,
    mask_source: Optional[torch.Tensor] = None,
    layout: Optional[Layout] = None,
    config: Optional[ISAConfig] = None,
) -> torch.Tensor:
    """:func:`~isa_plugin.adapters.processor.attend_with_key_mask` on tensors that hold the whole sequence
    (no exchange).

    ``layout``: the call's layout (default: the processor's); ``config``: the config of the heads in q
    (default ``proc.config``; the rank's slice under Ulysses).
    """
    dense = dense or proc.dense_call(q, k, v, attention_mask)
    if key_valid is None:
        return proc.attend_local(q, k, v, dense=dense, layout=layout, config=config)
    if key_valid.dtype != torch.bool or key_valid.shape != q.shape[:2]:
        return proc.attend_local(q, k, v, attention_mask=key_valid, dense=dense, layout=layout, config=config)
    if layout is None:
        layout = proc.resolve_layout(q.shape[1])
    all_valid, mask_reason, plan = _cached_mask_plan(proc, key_valid, layout, mask_source, q.device)
    if all_valid:
        return proc.attend_local(q, k, v, dense=dense, layout=layout, config=config)
    proc.observe(q, k, v, layout)
    reason = proc.why_dense(q, layout, config=config) or mask_reason
    routes = []
    if reason is None:
        for keep, _, lay in plan:  # one decision per batch entry (each has its own layout)
            route = proc.route(q[:1, : keep.numel()], lay, config=config)
            if route.backend == "dense":
                reason = route.reason
                break
            routes.append(route)
    if reason is not None:
        proc.record_fallback(reason)
        return dense()
    out = torch.empty_like(q)
    for b, ((keep, drop, lay), route) in enumerate(zip(plan, routes)):
        qb, kb, vb = q[b : b + 1, keep], k[b : b + 1, keep], v[b : b + 1, keep]
        out[b, keep] = run_isa(qb, kb, vb, lay, config or proc.config, route)[0]
        if drop.numel():
            out[b, drop] = dense_attention(q[b : b + 1, drop], kb, vb)[0]
    proc.record_isa(routes[-1].backend)
    return out
