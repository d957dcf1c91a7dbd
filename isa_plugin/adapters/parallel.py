"""ISA under diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``).

Under context parallelism each rank holds a contiguous shard of the sequence. diffusers' processors pass
their ``_parallel_config`` to ``dispatch_attention_fn``, whose Ulysses template exchanges the sequence
shards for head shards (all-to-all), runs the backend on the whole sequence with the rank's heads, and
exchanges back. ISA needs the whole sequence too (block statistics over every span), so the ISA
processors do the same exchange themselves, with diffusers' own all-to-all helpers:

1. ``[B, N/P, H, D]`` shards -> ``[B, N, H/P, D]``: the whole sequence with this rank's heads
   (rank r of the Ulysses group holds heads ``r·H/P … (r+1)·H/P − 1``);
2. ISA on it with the layer's ratios sliced to those heads (:func:`heads_config`; per-head ratios and
   the per-head values of a threshold profile alike), or the model's dense attention on the same
   tensors when the call is not eligible (counted, as on one GPU);
3. the inverse exchange back to ``[B, N/P, H, D]``.

Token order. A single-stream model (Wan, LTX, LTX-2) splits one sequence into contiguous chunks, so the
gathered order is the original order. Joint-attention models split the text and image streams separately
and each rank concatenates its own chunks, so the plain gather is rank-major,
``[text_0; image_0; text_1; image_1; …]``. The exchange undoes that: the processor declares the order of
its streams (:attr:`ISAAttnProcessorBase.cp_streams`), and the gathered tokens — and a key mask, gathered
the same way (QwenImage's text mask) — are put back in canonical order ``[text; image]`` within the same
copy the exchange makes anyway. ISA therefore sees exactly the layout, the blocks and the tokens of a
single-GPU call: its output equals single-GPU ISA.

Uneven shapes. Head counts not divisible by P, and the uneven shards of
``ContextParallelConfig(ulysses_anything=True)``, go through diffusers' "Ulysses anything" helpers (rank r
then holds ``ceil(H/P)`` heads, the last rank fewer) when the installed diffusers has them; otherwise the
call falls back (counted, :func:`unsupported_reason`).

What falls back to the model's own context-parallel dense attention (counted per layer, per rank, with
the reason): ring attention (``ring_degree > 1``) and the unified ring × Ulysses mode — ISA's pooled
statistics and block selection need every key block on the rank that owns a query head, which ring
attention never gathers; a head count the installed diffusers cannot spread over the ranks; attention
masks other than a text key mask; and the per-layer reasons (``dense mode``, ``layer left dense``,
``layout unknown``). Every such decision is made from values all ranks share (the configs, the
layout the transformer pre-hook computes from the unsplit inputs, the global lengths), so the ranks
always run the same collectives. Calls that are exchanged and then cannot run ISA (e.g. a sequence too
short) run dense attention on the exchanged tensors, which is what diffusers' Ulysses template computes.

Gated coarse residual (LIVEditor). The residual ``gate · coarse(q, k, v)`` pools whole-sequence blocks of
each head, which is exactly what a rank holds after the exchange: the processor all-gathers the per-token
gate of its shard once per call ([B, N], tiny next to q, k, v), runs ISA or the dense fallback with the
residual on the whole sequence of its heads, and exchanges back, so the output equals single-process ISA
with the gate. Such calls are always exchanged (a dense fallback also carries the residual); ring attention,
heads that cannot be spread and attention masks raise for them instead of falling back.

Counters are per process: on each rank :func:`isa_plugin.stats` counts the calls of that rank's
processors (one per layer call, whichever heads the rank served). All ranks take the same decision for
a call, so the counts agree across ranks.

HunyuanVideo-Framepack has no ``_cp_plan``; ``enable_parallelism(config=..., cp_plan=...)`` needs one
from the user. Its ISA processors declare the stream order ``[video; text]``; a plan must split the
packed video tokens and the text tokens along dim 1 at the first block (``transformer_blocks.0``:
``hidden_states``, ``encoder_hidden_states``), split the RoPE (``image_rotary_emb``, dim 0) the same way,
and gather the output at ``norm_out`` / ``proj_out`` (dim 1) before the history tokens are cut off. Its
key mask (batch > 1) is built for the whole sequence and is not split by such a plan: those calls run
dense (``attention mask present``), so use batch 1 (no mask) there.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..config import ISAConfig
from ..layout import Layout
from .masking import attend_key_mask_local

if TYPE_CHECKING:  # pragma: no cover
    from .processor import ISAAttnProcessorBase

__all__ = ["context_parallel_config", "unsupported_reason", "heads_config", "carry_settings", "UlyssesExchange",
           "ulysses_attend", "STREAM_ORDERS"]

logger = logging.getLogger(__name__)

#: stream orders a processor can declare (:attr:`ISAAttnProcessorBase.cp_streams`): how the tokens of one
#: rank's attention call are made of the model's split streams
STREAM_ORDERS = ("sequence", "text_first", "text_last")


def context_parallel_config(proc: Any):
    """The ``ContextParallelConfig`` a processor runs under (None without context parallelism)."""
    pc = getattr(proc, "_parallel_config", None)
    return getattr(pc, "context_parallel_config", None) if pc is not None else None


def carry_settings(src: Any, dst: Any) -> None:
    """Copy the attention backend and parallel config diffusers set on ``src`` to the processor ``dst``.

    ``enable_parallelism`` and ``set_attention_backend`` set them only on the processors installed in the
    model; a stock processor kept aside (for delegation, or to be restored by ``remove_isa``) must get them
    before it runs again, or its attention silently stays inside each rank's chunk.
    """
    for name in ("_attention_backend", "_parallel_config"):
        if hasattr(dst, name) and getattr(dst, name, None) is not getattr(src, name, None):
            setattr(dst, name, getattr(src, name, None))


def _anything_helpers():
    """diffusers' Ulysses-anything helpers ``(qkv exchange, output exchange, gather sizes)``, or None."""
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError:  # pragma: no cover
        return None
    fns = (getattr(ad, "all_to_all_single_any_qkv_async", None), getattr(ad, "all_to_all_single_any_o_async", None),
           getattr(ad, "gather_size_by_comm", None))
    return fns if all(f is not None for f in fns) else None


def _head_split(num_heads: int, world: int) -> Tuple[int, int]:
    """(heads per rank, padding heads) of diffusers' Ulysses(-anything) head split."""
    pad = (world - num_heads % world) % world
    return (num_heads + pad) // world, pad


def unsupported_reason(cp, num_heads: int) -> Optional[str]:
    """Why ISA cannot run under the context-parallel config ``cp`` with ``num_heads`` heads (None: it can).

    Args:
        cp: a diffusers ``ContextParallelConfig`` (after ``enable_parallelism``).
        num_heads: the attention call's head count H.

    Returns:
        the fallback reason counted by the processors, or None.

    Example:
        >>> unsupported_reason(ContextParallelConfig(ring_degree=2), 40)
        'context parallel: ring attention (ring_degree=2) is not supported by ISA; dense'
    """
    ring, uly = int(cp.ring_degree or 1), int(cp.ulysses_degree or 1)
    if ring > 1 and uly > 1:
        return f"context parallel: unified ring x Ulysses (ring_degree={ring}, ulysses_degree={uly}) is not supported by ISA; dense"
    if ring > 1:
        return f"context parallel: ring attention (ring_degree={ring}) is not supported by ISA; dense"
    if num_heads % uly:
        if _anything_helpers() is None:
            return (f"context parallel: {num_heads} heads are not divisible by ulysses_degree={uly} and this diffusers "
                    "has no Ulysses-anything helpers; dense")
        local, pad = _head_split(num_heads, uly)
        if pad >= local:
            return f"context parallel: {num_heads} heads cannot be spread over ulysses_degree={uly} ranks; dense"
    return None


@functools.lru_cache(maxsize=256)
def heads_config(config: ISAConfig, start: int, stop: int) -> ISAConfig:
    """``config`` for the heads ``start … stop − 1`` only: every per-head setting of its mode sliced, scalars kept.

    Example:
        >>> heads_config(ISAConfig(alpha_f=(0.5, 0.25, 1.0, 0.75)), 2, 4).alpha_f
        (1.0, 0.75)
    """
    return config.select_heads(start, stop)


def _split_sizes(n: int, world: int, uneven: bool) -> List[int]:
    """Per-rank lengths of a stream of ``n`` tokens as diffusers' sharders split it (chunk / tensor_split)."""
    if not uneven:
        return [n // world] * world if n % world == 0 else []
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


@functools.lru_cache(maxsize=64)
def _canonical_order(per_rank: Tuple[Tuple[int, ...], ...]) -> torch.Tensor:
    """Index mapping canonical positions to rank-major positions; ``per_rank[r][s]``: rank r's tokens of stream s."""
    starts, pos = [], 0
    for lens in per_rank:
        row = []
        for n in lens:
            row.append(pos)
            pos += n
        starts.append(row)
    parts = [torch.arange(starts[r][s], starts[r][s] + per_rank[r][s]) for s in range(len(per_rank[0])) for r in range(len(per_rank))]
    return torch.cat(parts)


class UlyssesExchange:
    """The Ulysses exchange of one attention call: sequence shards <-> the whole sequence with local heads.

    Built by :meth:`plan`; :meth:`to_heads` gathers q, k or v, :meth:`gather_keys` a key mask,
    :meth:`to_sequence` sends an output back. Uses diffusers' all-to-all helpers (``_all_to_all_single``,
    or the Ulysses-anything ones for uneven heads / shards).

    Attributes:
        world, rank: the Ulysses group's size and this rank's index in it.
        heads: ``(start, stop)``, the heads this rank computes.
        num_tokens: the whole sequence's length N.
    """

    def __init__(self, group, world: int, rank: int, num_heads: int, local_len: int, sizes: Sequence[int], uneven: bool,
                 order: Optional[torch.Tensor]):
        self.group, self.world, self.rank = group, world, rank
        self.num_heads, self.local_len, self.sizes, self.uneven = num_heads, local_len, list(sizes), uneven
        self.num_tokens = sum(self.sizes)
        local, _ = _head_split(num_heads, world)
        start = rank * local
        self.heads = (start, min(num_heads, start + local))
        self.order = order
        self.inverse = torch.argsort(order) if order is not None else None

    # ------------------------------------------------------------------ planning
    @staticmethod
    def global_sizes(cp, local_len: int) -> List[int]:
        """Every rank's shard length (a collective in ``ulysses_anything`` mode; all ranks must call it)."""
        world = int(cp.ulysses_degree)
        if not cp.ulysses_anything:
            return [local_len] * world
        return [int(s) for s in _anything_helpers()[2](local_len, cp._ulysses_mesh.get_group())]

    @classmethod
    def plan(cls, cp, num_heads: int, sizes: Sequence[int], streams: str, layout: Layout) -> Tuple[Optional["UlyssesExchange"], Optional[str]]:
        """The exchange of a call, or ``(None, reason)`` when its layout cannot be mapped onto the shards.

        Args:
            cp: the ``ContextParallelConfig``.
            num_heads: H of the call.
            sizes: every rank's shard length (:meth:`global_sizes`).
            streams: the processor's stream order (:data:`STREAM_ORDERS`).
            layout: the call's layout over the whole sequence (canonical order).
        """
        import torch.distributed as dist

        group = cp._ulysses_mesh.get_group()
        world, rank = int(cp.ulysses_degree), dist.get_rank(group=group)
        uneven = bool(cp.ulysses_anything) or num_heads % world != 0
        order = None
        if streams != "sequence":
            n_text = layout.num("text")
            lens = [n_text, layout.num_tokens - n_text]
            if streams == "text_last":
                lens.reverse()
            split = [_split_sizes(n, world, bool(cp.ulysses_anything)) for n in lens]
            per_rank = tuple(tuple(s[r] for s in split) for r in range(world)) if all(split) else ()
            if not per_rank or [sum(x) for x in per_rank] != list(sizes):
                return None, (f"context parallel: the layout's streams {lens} do not match the ranks' shards {list(sizes)}; dense")
            if all(n > 0 for n in lens) and world > 1:
                order = _canonical_order(per_rank)
        return cls(group, world, rank, num_heads, sizes[rank], sizes, uneven, order), None

    # ------------------------------------------------------------------ exchanges
    def _reorder(self, x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        if index is None:
            return x.contiguous()
        return x.index_select(1, index.to(x.device)).contiguous()

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N/P, H, D] shard -> [B, N, H_local, D], canonical token order."""
        if self.uneven:
            x = _anything_helpers()[0](x, self.group)()
        else:
            from diffusers.models.attention_dispatch import _all_to_all_single

            B, S, H, D = x.shape
            x = x.reshape(B, S, self.world, H // self.world, D).permute(2, 1, 0, 3, 4).contiguous()
            x = _all_to_all_single(x, self.group)
            x = x.flatten(0, 1).permute(1, 0, 2, 3)
        return self._reorder(x, self.order)

    def to_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """[B, N, H_local, D] in canonical order -> this rank's [B, N/P, H, D] shard."""
        out = self._reorder(out, self.inverse)
        if self.uneven:
            return _anything_helpers()[1](out, self.group, NUM_QO_HEAD=self.num_heads, Q_S_LOCAL=self.local_len)()
        from diffusers.models.attention_dispatch import _all_to_all_single

        B, N, Hl, D = out.shape
        out = out.reshape(B, self.world, N // self.world, Hl, D).permute(1, 3, 0, 2, 4).contiguous()
        out = _all_to_all_single(out, self.group)
        return out.flatten(0, 1).permute(1, 2, 0, 3).contiguous()

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N/P, ...] per-token values of this rank's tokens -> [B, N, ...] for the whole sequence, canonical
        order (one all-gather over the Ulysses group)."""
        import torch.distributed as dist

        x = x.contiguous()
        longest = max(self.sizes)
        if x.shape[1] < longest:
            x = torch.cat([x, x.new_zeros((x.shape[0], longest - x.shape[1], *x.shape[2:]))], dim=1)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        x = torch.cat([p[:, :n] for p, n in zip(parts, self.sizes)], dim=1)
        return self._reorder(x, self.order)

    def gather_keys(self, key_valid: torch.Tensor) -> torch.Tensor:
        """[B, N/P] bool key mask of this rank's tokens -> [B, N] for the whole sequence, canonical order."""
        return self.gather_tokens(key_valid.to(torch.uint8)).bool()  # gloo has no bool all_gather


def _dense_local(proc: "ISAAttnProcessorBase", q, k, v, mask) -> Callable[[], torch.Tensor]:
    """The model's backend on exchanged tensors (what diffusers' Ulysses template runs between its exchanges)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return lambda: dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=proc._attention_backend, parallel_config=None)


def ulysses_attend(
    proc: "ISAAttnProcessorBase",
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    dense: Optional[Callable[[], torch.Tensor]] = None,
    layout: Optional[Layout] = None,
    key_valid: Optional[torch.Tensor] = None,
    residual_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ISA (or the counted dense fallback) for one attention call of a processor under context parallelism.

    Args:
        proc: the calling ISA processor (``proc._parallel_config`` holds a context-parallel config).
        q, k, v: [B, N/P, H, D], this rank's shard after norms and RoPE, streams in ``proc.cp_streams`` order.
        attention_mask: what the stock call would pass; a mask other than ``key_valid``'s makes the call dense.
        dense: zero-argument callable running the model's own context-parallel attention on the shards
            (default ``proc.dense_call(q, k, v, attention_mask)``); used for calls that are not exchanged.
        layout: the call's layout over the whole sequence (default: the per-call context's).
        key_valid: [B, N/P] bool key mask of this rank's tokens (QwenImage's text mask), or None.
        residual_gate: [B, N/P] or [B, N/P, 1], the gate of this rank's tokens for a gated coarse residual
            (LIVEditor), or None. Such a call is always exchanged (:func:`_attend_gated`).

    Returns:
        [B, N/P, H, D], this rank's shard of the output.

    Raises:
        RuntimeError: a ``residual_gate`` under a context-parallel config that cannot give one rank every
            token of its heads (ring attention, heads that cannot be spread), with an attention mask, or for a
            processor whose streams are not one sequence.

    Example:
        >>> out = ulysses_attend(self, query, key, value)   # inside a processor whose _parallel_config is set
    """
    cp = context_parallel_config(proc)
    if residual_gate is not None:
        return _attend_gated(proc, cp, q, k, v, residual_gate, attention_mask=attention_mask, layout=layout)
    H = q.shape[2]
    masked = key_valid is not None and key_valid.dtype == torch.bool and tuple(key_valid.shape) == tuple(q.shape[:2])
    reason = proc.layer_reason() or unsupported_reason(cp, H)
    if reason is None and attention_mask is not None and not masked:
        reason = "attention mask present"
    ex = None
    if reason is None:
        sizes = UlyssesExchange.global_sizes(cp, q.shape[1])
        if layout is None:
            layout = proc.resolve_layout(sum(sizes))
        if layout is None:
            reason = "layout unknown"
        elif layout.num_tokens != sum(sizes):
            reason = f"layout covers {layout.num_tokens} tokens, call has {sum(sizes)}"
        else:
            ex, reason = UlyssesExchange.plan(cp, H, sizes, proc.cp_streams, layout)
    if reason is not None:
        proc.record_fallback(reason)
        return (dense or proc.dense_call(q, k, v, attention_mask))()

    qg, kg, vg = ex.to_heads(q), ex.to_heads(k), ex.to_heads(v)
    config = heads_config(proc.config, *ex.heads) if proc.config.num_heads == H else proc.config
    if masked:
        kv = ex.gather_keys(key_valid)
        mask = kv[:, None, None, :]
        out = attend_key_mask_local(proc, qg, kg, vg, kv, attention_mask=mask, dense=_dense_local(proc, qg, kg, vg, mask),
                                    layout=layout, config=config)
    else:
        out = proc.attend_local(qg, kg, vg, dense=_dense_local(proc, qg, kg, vg, None), layout=layout, config=config)
    return ex.to_sequence(out)


def _attend_gated(proc: "ISAAttnProcessorBase", cp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  residual_gate: torch.Tensor, *, attention_mask: Optional[torch.Tensor], layout: Optional[Layout]) -> torch.Tensor:
    """:func:`ulysses_attend` for a call with a gated coarse residual (LIVEditor).

    The residual pools whole-sequence blocks of every head, which after the exchange each rank holds for
    its heads; the per-token gate is all-gathered once ([B, N], tiny next to q, k, v). Every such call is
    exchanged, whatever it runs then (ISA, or a dense fallback for the layer's or the call's reason, counted
    by :meth:`~isa_plugin.adapters.processor.ISAAttnProcessorBase.attend_local` as on one process), so the
    residual is always added and the output equals the single-process one.
    """
    H = q.shape[2]
    why = unsupported_reason(cp, H)
    why = why.removesuffix("; dense") if why is not None else None
    if why is None and attention_mask is not None:
        why = "an attention mask"
    if why is None and proc.cp_streams != "sequence":
        why = f"the stream order {proc.cp_streams!r}"
    if why is not None:
        raise RuntimeError(
            f"{proc.layer_name or type(proc).__name__}: the gated coarse residual pools whole-sequence blocks of every head "
            f"and cannot run under this context-parallel call ({why}); use ContextParallelConfig(ulysses_degree=P)"
        )
    sizes = UlyssesExchange.global_sizes(cp, q.shape[1])
    if layout is None:
        layout = proc.resolve_layout(sum(sizes))
    ex, _ = UlyssesExchange.plan(cp, H, sizes, "sequence", layout)  # one sequence: the layout is not needed
    qg, kg, vg = ex.to_heads(q), ex.to_heads(k), ex.to_heads(v)
    gate = ex.gather_tokens(residual_gate)
    config = proc.config
    if config is not None and config.num_heads == H:
        config = heads_config(config, *ex.heads)
    out = proc.attend_local(qg, kg, vg, dense=_dense_local(proc, qg, kg, vg, None), layout=layout, config=config,
                            residual_gate=gate)
    return ex.to_sequence(out)
