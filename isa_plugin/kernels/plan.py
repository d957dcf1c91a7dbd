"""Compact ISA plans: index lists the Triton attention kernel walks, built on the GPU with torch ops.

The reference :class:`~isa_plugin.kernels.reference.ISAPlan` holds dense boolean masks ([B, H, nb, nb]);
the kernels need lists. :class:`CompactPlan` holds, per (batch, head):

- ``kv_list`` [B, H, Kmax] int32: the KV' blocks (target, text, kept context), full-size blocks first
  (ascending), then short ones (ascending); ``kv_len`` [B, H] entries are valid, the first ``kv_full``
  of them are full-size blocks. The exact-attention path may hand a common prefix of full blocks to
  cuDNN and walk the rest itself.
- ``exact_q`` [B, H, nb] bool: query blocks that attend exactly over KV'.
- ``tsel`` [B, H, nb, S] int32 and ``tsel_len`` [B, H, nb]: for Taylor query blocks, the KV' blocks
  computed exactly (every text block, then the top ⌈α_ns·K'⌉ non-text blocks).
- ``approx`` [B, H, nb, Kmax] int8: 1 where the KV' block at that ``kv_list`` position enters the
  Taylor query block as a block-mean pseudo-key.

:func:`plan_compact` computes the same selections as
:func:`~isa_plugin.kernels.reference.plan_reference` (pooling in Triton, the rest in torch);
:func:`compact_from_reference` / :func:`compact_to_reference` convert plans both ways (for tests).

Deferred selections: the exact group needs only steps 1-6 (KV' lists and the grouping). A plan made with
``plan_compact(..., defer_selections=True)`` carries the inputs of step 7 (the Taylor selections) in
:attr:`CompactPlan.pending` and computes them when :meth:`CompactPlan.finish_selections` is called. The
executor calls it after queueing the exact group, so the host work of step 7 overlaps the long
exact-attention kernels instead of delaying their launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..config import ISAConfig
from ..layout import CONTEXT, TARGET, TEXT, BlockLayout
from .counts import keep_count, topk_count
from .reference import ISAPlan

__all__ = ["CompactPlan", "PendingSelections", "plan_compact", "plan_compact_from_pooled", "compact_from_reference", "compact_to_reference"]


@dataclass
class CompactPlan:
    """Index-list form of an ISA plan (see the module docstring for the fields).

    ``host`` holds per-head counts known on the host, so execution needs no device synchronisation:
    ``nq_exact`` / ``n_taylor`` (the most exact / Taylor query blocks of any batch entry, per head) and
    ``full_min`` (a lower bound of ``kv_full`` over the batch, per head).

    ``pending`` is set while the Taylor selections (``tsel``, ``tsel_len``, ``approx``) are not computed
    yet (a plan from ``plan_compact(..., defer_selections=True)``); :meth:`finish_selections` computes
    them. The exact group may run before that; the Taylor group may not.
    """

    blocks: BlockLayout
    kv_keep: torch.Tensor  # [B, H, nb] bool
    kv_list: torch.Tensor  # [B, H, Kmax] int32
    kv_len: torch.Tensor  # [B, H] int32
    kv_full: torch.Tensor  # [B, H] int32
    exact_q: torch.Tensor  # [B, H, nb] bool
    tsel: torch.Tensor  # [B, H, nb, S] int32
    tsel_len: torch.Tensor  # [B, H, nb] int32
    approx: torch.Tensor  # [B, H, nb, Kmax] int8
    sharpness: Optional[torch.Tensor] = None
    saliency: Optional[torch.Tensor] = None
    host: Optional[Dict[str, List[int]]] = None
    taylor_qb: Optional[torch.Tensor] = None  # [B, H, T] Taylor query blocks (-1 = padding), when known
    pooled_kv: Optional[tuple] = None  # (kbar, vbar) [B*H, nb, D] in the input dtype, when pooled with q
    pending: Optional["PendingSelections"] = None  # inputs of step 7 while the Taylor selections are deferred
    block_meta: Optional[tuple] = None  # (starts int32, counts int32, log2 counts float32) [nb] on the device

    @property
    def shape(self):
        return tuple(self.kv_keep.shape)

    def finish_selections(self, use_kernel: Optional[bool] = None) -> "CompactPlan":
        """Compute the deferred Taylor selections (step 7) in place; a no-op when they are computed.

        Args:
            use_kernel: run the Triton selection kernel over the Taylor query blocks (default: when the
                pooled logits are float32); otherwise torch ops over every row.

        Returns:
            ``self``, with ``tsel`` [B, H, nb, S], ``tsel_len`` [B, H, nb], ``approx`` [B, H, nb, Kmax]
            set and ``pending`` None.

        Example:
            >>> cp = plan_compact(q, k, layout, config, v=v, defer_selections=True)  # doctest: +SKIP
            >>> # ... queue the exact group ...
            >>> cp.finish_selections()  # doctest: +SKIP
        """
        if self.pending is not None:
            _finish_selections(self, use_kernel)
        return self

    def pair_counts(self):
        """(exact token pairs, approximated (query token, pseudo-key) pairs), summed over batch and heads."""
        cnt = self.blocks.counts.to(self.kv_keep.device, torch.float64)
        B, H, nb = self.kv_keep.shape
        kv_tokens = (self.kv_keep.double() * cnt).sum(-1)  # [B, H]
        exact_rows = (self.exact_q.double() * cnt).sum(-1)
        exact = float((exact_rows * kv_tokens).sum())
        tay = ~self.exact_q
        valid = torch.arange(self.tsel.shape[-1], device=cnt.device) < self.tsel_len.unsqueeze(-1)
        sel_tokens = (cnt[self.tsel.long()] * valid).sum(-1)  # [B, H, nb]
        exact += float((sel_tokens * cnt * tay).sum())
        n_approx = self.approx.double().sum(-1)
        approx = float((n_approx * cnt * tay).sum())
        return exact, approx


@dataclass
class PendingSelections:
    """What step 7 (the Taylor selections) of a deferred plan needs besides the plan's own lists.

    ``logits`` [B, H, nb, nb]: the scaled pooled logits q̄·k̄ᵀ of steps 3-6; ``static``: the plan's
    layout- and config-derived counts and index tensors (the planner's cache entry).
    """

    logits: torch.Tensor
    static: "_Static"


class _Static:
    """Everything about a plan that depends only on the layout, the config and H (cached per device)."""

    def __init__(self, blocks: BlockLayout, config: ISAConfig, H: int, device: str):
        kinds = blocks.kinds
        bs = blocks.block_size
        dev = torch.device(device)
        self.blocks = blocks.to(dev)
        nb = blocks.num_blocks
        is_t, is_c, is_x = kinds == TARGET, kinds == CONTEXT, kinds == TEXT
        short = blocks.counts < bs
        self.n_t, self.n_c, self.n_x = int(is_t.sum()), int(is_c.sum()), int(is_x.sum())
        self.n_nt = nb - self.n_x
        n_short_ctx = int((short & is_c).sum())
        n_full_nonctx = int((~short & ~is_c).sum())

        def vals(name):
            v = getattr(config, name)
            return list(v) if isinstance(v, tuple) else [v] * H

        a_s, a_f, a_ns = vals("alpha_s"), vals("alpha_f"), vals("alpha_ns")
        self.cnt_s = [keep_count(a, self.n_c) for a in a_s]
        self.cnt_f = [keep_count(a, self.n_nt) for a in a_f]
        self.n_exact = [keep_count(a, self.n_t + c) for a, c in zip(a_ns, self.cnt_s)]
        self.kmax = max(1, (nb - self.n_c) + max(self.cnt_s))
        self.s_max = max(1, max(self.n_exact))
        self.host = dict(
            nq_exact=[c + self.n_x for c in self.cnt_f],
            n_taylor=[self.n_nt - c for c in self.cnt_f],
            full_min=[n_full_nonctx + max(0, c - n_short_ctx) for c in self.cnt_s],
        )
        self.topk = topk_count(config.topk_fraction, self.n_t)
        self.is_t, self.is_c, self.is_x = is_t.to(dev), is_c.to(dev), is_x.to(dev)
        self.t_idx = _index(is_t, dev)
        self.c_idx = _index(is_c, dev)
        self.nt_idx = _index(~is_x, dev)
        self.x_ids = torch.nonzero(is_x).squeeze(1).to(dev)
        self.short = short.to(dev)
        self.cnt_s_d = torch.tensor(self.cnt_s, device=dev)
        self.cnt_f_d = torch.tensor(self.cnt_f, device=dev)
        self.n_exact_d = torch.tensor(self.n_exact, device=dev)
        self.kv_base = (~is_c).to(dev)
        self.arange_nb = torch.arange(nb, device=dev)
        self.starts32 = self.blocks.starts.to(torch.int32)
        self.counts32 = self.blocks.counts.to(torch.int32)
        self.log2n = torch.log2(self.blocks.counts.to(torch.float32))


def _index(mask: torch.Tensor, dev):
    """A slice when the True entries are one contiguous run (no copy on indexing), else an index tensor."""
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx.to(dev)


_STATIC_CACHE: Dict[tuple, _Static] = {}


def _static(blocks: BlockLayout, config: ISAConfig, H: int, device) -> _Static:
    if blocks.starts.device.type != "cpu":
        blocks = BlockLayout(blocks.block_size, *(t.cpu() for t in (blocks.starts, blocks.counts, blocks.kinds, blocks.spans, blocks.token_block)))
    key = (blocks.starts.numpy().tobytes(), blocks.counts.numpy().tobytes(), blocks.kinds.numpy().tobytes(), blocks.block_size,
           config.alpha_s, config.alpha_f, config.alpha_ns, config.topk_fraction, H, str(device))
    st = _STATIC_CACHE.get(key)
    if st is None:
        if len(_STATIC_CACHE) > 64:
            _STATIC_CACHE.clear()
        st = _STATIC_CACHE[key] = _Static(blocks, config, H, str(device))
    return st


def _kv_lists(kv_keep: torch.Tensor, blocks: BlockLayout, kmax: Optional[int] = None):
    B, H, nb = kv_keep.shape
    dev = kv_keep.device
    idx = torch.arange(nb, device=dev)
    short = blocks.counts.to(dev) < blocks.block_size
    key = (~kv_keep).long() * (2 * nb) + short.long() * nb + idx
    kv_len = kv_keep.sum(-1)
    if kmax is None:
        kmax = max(1, int(kv_len.max()))
    kv_list = torch.topk(key, kmax, dim=-1, largest=False, sorted=True).indices
    kv_full = (kv_keep & ~short).sum(-1)
    return kv_list, kv_len, kv_full


def _build(kv_keep, exact_q, kv_list, kv_len, kv_full, sel_pos, blocks, sharp=None, sal=None, sel_first=None, s_max=None, host=None, text_ids=None) -> CompactPlan:
    """sel_pos [B, H, nb, Kmax] bool: non-text KV' positions computed exactly by Taylor query blocks.

    ``sel_first`` [B, H, nb, s] (optional): those positions, selected ones first in each row, when the
    caller already has them (saves a top-k); ``s_max``: the most selected positions of any row.
    """
    B, H, nb = kv_keep.shape
    dev = kv_keep.device
    kinds = blocks.kinds.to(dev)
    is_x = kinds == TEXT
    kmax = kv_list.shape[-1]
    pos = torch.arange(kmax, device=dev)
    valid = pos < kv_len.unsqueeze(-1)  # [B, H, Kmax]
    text_at = is_x[kv_list] & valid  # [B, H, Kmax]
    nontext_valid = valid & ~text_at
    sel_pos = sel_pos & nontext_valid[:, :, None, :]
    n_sel = sel_pos.sum(-1)  # [B, H, nb]
    if sel_first is None:
        s_max = max(1, int(n_sel.max()) if n_sel.numel() else 1)
        key = (~sel_pos).long() * kmax + pos
        sel_first = torch.topk(key, min(s_max, kmax), dim=-1, largest=False, sorted=True).indices  # [B, H, nb, s]
    sel_blocks = torch.gather(kv_list[:, :, None, :].expand(B, H, nb, kmax), -1, sel_first)
    if text_ids is None:
        text_ids = _text_ids(blocks, dev)
    n_text = int(text_ids.numel())
    # text ids first (the same for every row), then each row's n_sel selected ids
    tsel = torch.cat([text_ids.view(1, 1, 1, -1).expand(B, H, nb, n_text), sel_blocks], dim=-1)
    tsel_len = (n_sel + n_text).to(torch.int32)
    # text KV' blocks are always exact; only non-text, unselected KV' blocks are pseudo-keys
    approx = nontext_valid[:, :, None, :] & ~sel_pos
    if host is None:
        nq = exact_q.sum(-1)
        host = dict(
            nq_exact=nq.max(0).values.tolist(),
            n_taylor=(nb - nq).max(0).values.tolist(),
            full_min=kv_full.min(0).values.tolist(),
        )
    return CompactPlan(
        blocks=blocks,
        kv_keep=kv_keep,
        kv_list=kv_list.to(torch.int32).contiguous(),
        kv_len=kv_len.to(torch.int32).contiguous(),
        kv_full=kv_full.to(torch.int32).contiguous(),
        exact_q=exact_q,
        tsel=tsel.to(torch.int32).contiguous(),
        tsel_len=tsel_len.contiguous(),
        approx=approx.to(torch.int8).contiguous(),
        sharpness=sharp,
        saliency=sal,
        host=host,
    )


def _text_ids(blocks: BlockLayout, dev):
    kinds = blocks.kinds if blocks.kinds.device.type == "cpu" else blocks.kinds.cpu()
    return torch.nonzero(kinds == TEXT).squeeze(1).to(dev)


def _rank_mask(scores: torch.Tensor, count: torch.Tensor, kmax: int, uniform: bool = False) -> torch.Tensor:
    """Mark the ``count`` (broadcast over the last dim) highest scores along the last dim; kmax >= count."""
    n = scores.shape[-1]
    kmax = min(max(kmax, 0), n)
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return out
    if uniform:  # every row keeps kmax entries: order is irrelevant, skip the sort
        top = torch.topk(scores, kmax, dim=-1, largest=True, sorted=False).indices
        out.scatter_(-1, top, True)
        return out
    top = torch.topk(scores, kmax, dim=-1, largest=True, sorted=True).indices
    r = torch.arange(kmax, device=scores.device)
    out.scatter_(-1, top, r < count.unsqueeze(-1))
    return out


def _plan_stage1(qbar, kbar, blocks: BlockLayout, config: ISAConfig, scale: float) -> CompactPlan:
    """Steps 3-6 and the KV' lists: enough for the exact group (step 7 pending)."""
    B, H, nb, _ = qbar.shape
    dev = qbar.device
    st = _static(blocks, config, H, dev)
    blocks = st.blocks
    if config.share_plan and B > 1:  # one plan for the batch, from the batch-mean block means (k̄, v̄ of
        # the pseudo-keys stay per entry); planning the identical rows B times keeps every shape as is
        qbar = qbar.mean(0, keepdim=True).expand_as(qbar).contiguous()
        kbar = kbar.mean(0, keepdim=True).expand_as(kbar).contiguous()

    logits = torch.matmul(qbar, kbar.transpose(-1, -2)).mul_(scale)  # [B, H, nb, nb]
    P = torch.softmax(logits, dim=-1)

    # step 4: context pre-selection
    saliency = torch.zeros(B, H, nb, device=dev, dtype=P.dtype)
    kv_keep = st.kv_base.expand(B, H, nb).clone()
    if st.n_c:
        sal_c = torch.matmul(st.is_t.to(P.dtype), P[..., st.c_idx])  # [B, H, C]
        saliency[..., st.c_idx] = sal_c
        kv_keep[..., st.c_idx] = _rank_mask(sal_c, st.cnt_s_d.expand(B, H), max(st.cnt_s), min(st.cnt_s) == max(st.cnt_s))

    # step 5: sharpness
    if config.sharpness == "topk_mass":
        if isinstance(st.t_idx, slice) and P.dtype == torch.float32 and P.is_cuda:
            from .select import topk_mass_triton

            sharp = topk_mass_triton(P, st.t_idx.start, st.t_idx.stop - st.t_idx.start, st.topk)
        else:
            sharp = P[..., st.t_idx].topk(st.topk, dim=-1, sorted=False).values.sum(-1)
    else:
        sharp = (P * P).sum(-1)
    del P
    sharp = sharp.masked_fill(st.is_x, float("inf"))

    # step 6: grouping
    exact_q = st.is_x.expand(B, H, nb).clone()
    exact_q[..., st.nt_idx] = _rank_mask(sharp[..., st.nt_idx], st.cnt_f_d.expand(B, H), max(st.cnt_f), min(st.cnt_f) == max(st.cnt_f))

    kv_list, kv_len, kv_full = _kv_lists(kv_keep, blocks, st.kmax)
    return CompactPlan(
        blocks=blocks, kv_keep=kv_keep, kv_list=kv_list.to(torch.int32), kv_len=kv_len.to(torch.int32),
        kv_full=kv_full.to(torch.int32), exact_q=exact_q, tsel=None, tsel_len=None, approx=None,
        sharpness=sharp.float(), saliency=saliency.float(), host=st.host,
        pending=PendingSelections(logits=logits, static=st), block_meta=(st.starts32, st.counts32, st.log2n),
    )


def select_blocks(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Per (b, h), the first ``count`` block ids where ``mask`` [B, H, nb] is True (ascending), padded
    with -1 where a row has fewer: [B, H, count] int64. No host synchronisation."""
    B, H, nb = mask.shape
    ar = torch.arange(nb, device=mask.device)
    key = (~mask).long() * nb + ar
    idx = torch.topk(key, count, dim=-1, largest=False, sorted=True).indices
    ok = torch.gather(mask, -1, idx)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def _finish_selections(cp: CompactPlan, use_kernel: Optional[bool]) -> None:
    """Step 7 (Taylor selections) of a plan with ``pending`` set (see :meth:`CompactPlan.finish_selections`)."""
    logits, st = cp.pending.logits, cp.pending.static
    cp.pending = None
    B, H, nb = cp.exact_q.shape
    dev = cp.exact_q.device
    kmax = st.kmax
    if use_kernel is None:
        use_kernel = logits.dtype == torch.float32
    if use_kernel:
        from .select import taylor_select_triton

        n_t = max(st.host["n_taylor"])
        qb = select_blocks(~cp.exact_q, n_t) if n_t else torch.empty(B, H, 0, device=dev, dtype=torch.long)
        cp.tsel, cp.tsel_len, cp.approx = taylor_select_triton(
            logits, qb, cp.kv_list, cp.kv_len, st.blocks.kinds, st.x_ids, st.n_exact_d, min(st.s_max, kmax)
        )
        cp.taylor_qb = qb
        return
    kv_list, kv_len = cp.kv_list.long(), cp.kv_len.long()
    pos = torch.arange(kmax, device=dev)
    cand = (pos < kv_len.unsqueeze(-1)) & ~st.is_x[kv_list]  # [B, H, Kmax]
    lg = torch.gather(logits, -1, kv_list[:, :, None, :].expand(B, H, nb, kmax))
    del logits
    lg.masked_fill_(~cand[:, :, None, :], float("-inf"))
    s_max = min(st.s_max, kmax)
    uniform = min(st.n_exact) == s_max  # every row selects s_max blocks: no ranks needed
    top = torch.topk(lg, s_max, dim=-1, largest=True, sorted=not uniform).indices  # [B, H, nb, s_max]
    del lg
    sel_pos = torch.zeros(B, H, nb, kmax, dtype=torch.bool, device=dev)
    if uniform:
        sel_pos.scatter_(-1, top, True)
    else:
        sel_pos.scatter_(-1, top, (torch.arange(s_max, device=dev) < st.n_exact_d[None, :, None, None]).expand(B, H, nb, s_max))
    full = _build(cp.kv_keep, cp.exact_q, kv_list, kv_len, cp.kv_full, sel_pos, cp.blocks, cp.sharpness, cp.saliency,
                  sel_first=top, host=st.host, text_ids=st.x_ids)
    cp.tsel, cp.tsel_len, cp.approx = full.tsel, full.tsel_len, full.approx


def plan_compact_from_pooled(qbar, kbar, blocks: BlockLayout, config: ISAConfig, scale: float) -> CompactPlan:
    """Steps 3-7 of ISA from block means q̄, k̄ [B, H, nb, D] (float32), as index lists.

    Launches only device work (no host synchronisation): every count is known from the layout and
    the ratios.
    """
    return _plan_stage1(qbar, kbar, blocks, config, scale).finish_selections()


def plan_compact(
    q, k, layout, config: ISAConfig, scale: Optional[float] = None, v: Optional[torch.Tensor] = None, defer_selections: bool = False
) -> CompactPlan:
    """Steps 1-7 of ISA for q, k [B, N, H, D]: Triton pooling, then :func:`plan_compact_from_pooled`.

    Args:
        q, k: [B, N, H, D] with a unit stride on D. layout: :class:`~isa_plugin.Layout` covering N.
        config: ratios, block size and sharpness metric. scale: softmax scale (default 1/sqrt(D)).
        v: [B, N, H, D] with q's and k's strides: pooled in the same pass, and the block means k̄, v̄
            the Taylor branch needs are kept in ``pooled_kv``.
        defer_selections: leave step 7 (the Taylor selections) pending; call
            :meth:`CompactPlan.finish_selections` before the Taylor group (the executor does).

    Returns:
        A :class:`CompactPlan`. No host synchronisation.

    Example:
        >>> cp = plan_compact(q, k, Layout([("target", 4096), ("context", 4096)]), ISAConfig(), v=v)  # doctest: +SKIP
    """
    from .pooling import pool_blocks_triton

    blocks = layout.blocks(config.block_size)
    B, N, H, D = q.shape
    st = _static(blocks, config, H, q.device)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    starts, counts = st.starts32, st.counts32
    pooled_kv = None
    if v is not None and q.stride() == k.stride() == v.stride():
        qbar, kbar, vbar = pool_blocks_triton(q, k, v, starts=starts, counts=counts, block_size=config.block_size)
        nb = st.blocks.num_blocks
        pooled_kv = (kbar.to(k.dtype).reshape(B * H, nb, D), vbar.to(v.dtype).reshape(B * H, nb, D))
    elif q.stride() == k.stride():
        qbar, kbar = pool_blocks_triton(q, k, starts=starts, counts=counts, block_size=config.block_size)
    else:
        (qbar,) = pool_blocks_triton(q, starts=starts, counts=counts, block_size=config.block_size)
        (kbar,) = pool_blocks_triton(k, starts=starts, counts=counts, block_size=config.block_size)
    cp = _plan_stage1(qbar, kbar, blocks, config, sc)
    cp.pooled_kv = pooled_kv
    return cp if defer_selections else cp.finish_selections()


def compact_from_reference(plan: ISAPlan) -> CompactPlan:
    """Convert a reference :class:`ISAPlan` (dense masks) into a :class:`CompactPlan`."""
    blocks = plan.blocks
    kv_keep = plan.kv_keep
    B, H, nb = kv_keep.shape
    kv_list, kv_len, kv_full = _kv_lists(kv_keep, blocks)
    kmax = kv_list.shape[-1]
    sel_pos = torch.gather(plan.exact_kv, -1, kv_list[:, :, None, :].expand(B, H, nb, kmax))
    sel_pos = sel_pos & ~plan.exact_query[..., None]
    return _build(kv_keep, plan.exact_query.clone(), kv_list, kv_len, kv_full, sel_pos, blocks, plan.sharpness, plan.saliency)


def compact_to_reference(cp: CompactPlan) -> ISAPlan:
    """Convert a :class:`CompactPlan` into the reference :class:`ISAPlan` (dense [B, H, nb, nb] masks)."""
    B, H, nb = cp.kv_keep.shape
    dev = cp.kv_keep.device
    S = cp.tsel.shape[-1]
    valid = torch.arange(S, device=dev) < cp.tsel_len.unsqueeze(-1)
    tay = torch.zeros(B, H, nb, nb + 1, dtype=torch.bool, device=dev)
    idx = torch.where(valid, cp.tsel.long(), torch.full_like(cp.tsel.long(), nb))
    tay.scatter_(-1, idx, True)
    tay = tay[..., :nb]
    exact_kv = torch.where(cp.exact_q[..., None], cp.kv_keep[:, :, None, :], tay)
    sharp = cp.sharpness if cp.sharpness is not None else torch.zeros(B, H, nb, device=dev)
    sal = cp.saliency if cp.saliency is not None else torch.zeros(B, H, nb, device=dev)
    return ISAPlan(blocks=cp.blocks, kv_keep=cp.kv_keep, exact_query=cp.exact_q, exact_kv=exact_kv, sharpness=sharp, saliency=sal)
