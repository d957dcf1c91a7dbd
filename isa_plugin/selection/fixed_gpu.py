"""The fixed mode's GPU planner: a :class:`~isa_plugin.kernels.compact.CompactPlan` built on the device.

:func:`plan_compact` computes the same selections as :meth:`FixedMode.plan <isa_plugin.selection.fixed.FixedMode.plan>`
(pooling in Triton, the rest in torch and Triton selection kernels) without host synchronisation: every
count is known from the layout and the ratios. With ``defer_selections=True`` the Taylor selections (step
5 of the mode) are left pending and computed by :meth:`CompactPlan.finish_selections`, which the executor
calls after queueing the exact group.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from ..kernels.compact import CompactPlan, PendingSelections, build_compact, kv_lists, select_blocks
from ..kernels.counts import keep_count, topk_count
from ..layout import CONTEXT, TARGET, TEXT, BlockLayout

__all__ = ["plan_compact", "plan_compact_from_pooled"]


class _Static:
    """Everything about a plan that depends only on the layout, the config and H (cached per device)."""

    def __init__(self, blocks: BlockLayout, config: Any, H: int, device: str):
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


def _static(blocks: BlockLayout, config: Any, H: int, device) -> _Static:
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


def _plan_stage1(qbar, kbar, blocks: BlockLayout, config: Any, scale: float) -> CompactPlan:
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
            from ..kernels.select import topk_mass_triton

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

    kv_list, kv_len, kv_full = kv_lists(kv_keep, blocks, st.kmax)
    return CompactPlan(
        blocks=blocks, kv_keep=kv_keep, kv_list=kv_list.to(torch.int32), kv_len=kv_len.to(torch.int32),
        kv_full=kv_full.to(torch.int32), exact_q=exact_q, tsel=None, tsel_len=None, approx=None,
        sharpness=sharp.float(), saliency=saliency.float(), host=st.host,
        pending=PendingSelections(finish=_finish_selections, logits=logits, static=st), block_meta=(st.starts32, st.counts32, st.log2n),
    )


def _finish_selections(cp: CompactPlan, pending: PendingSelections, use_kernel: Optional[bool]) -> None:
    """The Taylor selections of a plan whose ``pending`` was set (see :meth:`CompactPlan.finish_selections`)."""
    logits, st = pending.logits, pending.static
    B, H, nb = cp.exact_q.shape
    dev = cp.exact_q.device
    kmax = st.kmax
    if use_kernel is None:
        use_kernel = logits.dtype == torch.float32
    if use_kernel:
        from ..kernels.select import taylor_select_triton

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
    full = build_compact(cp.kv_keep, cp.exact_q, kv_list, kv_len, cp.kv_full, sel_pos, cp.blocks, cp.sharpness, cp.saliency,
                  sel_first=top, host=st.host, text_ids=st.x_ids)
    cp.tsel, cp.tsel_len, cp.approx = full.tsel, full.tsel_len, full.approx


def plan_compact_from_pooled(qbar, kbar, blocks: BlockLayout, config: Any, scale: float) -> CompactPlan:
    """Steps 3-7 of ISA from block means q̄, k̄ [B, H, nb, D] (float32), as index lists.

    Launches only device work (no host synchronisation): every count is known from the layout and
    the ratios.
    """
    return _plan_stage1(qbar, kbar, blocks, config, scale).finish_selections()


def plan_compact(
    q, k, layout, config: Any, scale: Optional[float] = None, v: Optional[torch.Tensor] = None, defer_selections: bool = False
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
    from ..kernels.pooling import pool_blocks_triton

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


