"""Execution of a :class:`~isa_plugin.kernels.compact.CompactPlan`: the exact group and the Taylor group.

Two ways to run the exact group (query blocks that attend over all of KV'):

- ``"triton"``: :func:`~isa_plugin.kernels.isa_attn.isa_attn_items` walks each (b, h)'s KV' list.
- ``"sdpa"``: per chunk of heads, gather the exact query rows and a common prefix of full KV' blocks
  into dense [B, Hc, L, D] tensors and run cuDNN attention (torch's private op that also returns the
  log-sum-exp); the Triton kernel then folds in the KV' blocks that are not in the common prefix (short
  blocks, or blocks beyond the shortest list of the chunk) and scatters the rows back to their tokens.
  Heads are chunked so that the gathered copies stay under about one size of k.

The Taylor group always runs in Triton, queued after the exact group. A plan whose Taylor selections
are deferred (a planner that defers them) has them computed between the two groups
(:meth:`~isa_plugin.kernels.compact.CompactPlan.finish_selections`), so their host work overlaps the
exact-attention kernels. (A side stream for the Taylor group measured no gain: cuDNN fills every SM.)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .isa_attn import isa_attn_items
from .compact import CompactPlan, select_blocks as _select_blocks
from .pooling import gather_blocks_triton, pool_blocks_triton

__all__ = ["execute_compact", "sdpa_with_lse"]


def sdpa_with_lse(q, k, v, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention on [B, H, L, D] tensors returning (out, natural-log lse [B, H, Lq] float32).

    Uses cuDNN attention when it accepts the inputs, else the flash backend.
    """
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    except Exception:  # cuDNN unavailable or refusing this shape: the flash backend
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    o, lse = res[0], res[1]
    B, H, L, _ = q.shape
    lse = lse.reshape(B, H, L).float().contiguous()
    return o, lse


def _to_dev(values, dev, dtype=torch.long):
    """A small host list on the device without a device synchronisation (pinned, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _pooled_kv(k, v, cp: CompactPlan, starts, counts):
    B, N, H, D = k.shape
    nb = starts.numel()
    if k.stride() == v.stride():
        kbar, vbar = pool_blocks_triton(k, v, starts=starts, counts=counts, block_size=cp.blocks.block_size)
    else:
        kbar = pool_blocks_triton(k, starts=starts, counts=counts, block_size=cp.blocks.block_size)[0]
        vbar = pool_blocks_triton(v, starts=starts, counts=counts, block_size=cp.blocks.block_size)[0]
    return kbar.to(k.dtype).reshape(B * H, nb, D), vbar.to(v.dtype).reshape(B * H, nb, D)


def _run_taylor(q, k, v, out, kbar, vbar, log2n, starts, counts, cp: CompactPlan, scale):
    B, H, nb = cp.exact_q.shape
    n_t = max(cp.host["n_taylor"]) if cp.host else nb
    if n_t == 0:
        return
    qb = cp.taylor_qb if cp.taylor_qb is not None else _select_blocks(~cp.exact_q, n_t)  # [B, H, n_t]
    w_bh = _cached(("tbh", B, H, n_t, q.device), lambda: torch.arange(B * H, device=q.device, dtype=torch.int32).view(B, H, 1).expand(B, H, n_t).reshape(-1).contiguous())
    isa_attn_items(
        q, k, v, out, kbar, vbar, log2n, starts, counts,
        w_bh, qb.reshape(-1), w_bh, cp.tsel_len.reshape(-1), cp.tsel.reshape(-1),
        block_size=cp.blocks.block_size, scale=scale, taylor=True, tay_s=cp.tsel.shape[-1],
        kv_list=cp.kv_list.reshape(B * H, -1), kv_len=cp.kv_len.reshape(-1), approx=cp.approx.reshape(B * H, nb, -1),
    )


_CACHE = {}


def _cached(key, make):
    """Small device tensors that depend only on shapes (work-item templates), built once."""
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) > 256:
            _CACHE.clear()
        t = _CACHE[key] = make()
    return t


def _run_exact_triton(q, k, v, out, kbar, vbar, log2n, starts, counts, cp: CompactPlan, scale, heads=None):
    B, H, nb = cp.exact_q.shape
    hs = list(range(H)) if heads is None else list(heads)
    n_q = max(cp.host["nq_exact"][h] for h in hs) if cp.host else nb
    if n_q == 0 or not hs:
        return
    hs_d = _to_dev(hs, q.device) if heads is not None else torch.arange(H, device=q.device)
    Hs = len(hs)
    qb = _select_blocks(cp.exact_q[:, hs_d], n_q)  # [B, Hs, n_q]
    kmax = cp.kv_list.shape[-1]
    w_bh = (torch.arange(B, device=q.device).view(B, 1, 1) * H + hs_d.view(1, Hs, 1)).expand(B, Hs, n_q).reshape(-1)
    w_llen = cp.kv_len.reshape(-1)[w_bh]
    order = torch.argsort(w_llen, descending=True, stable=True)  # heavy items first
    w_bh, w_llen = w_bh[order], w_llen[order]
    w_qb = qb.reshape(-1)[order].to(torch.int32)
    w_loff = w_bh * kmax
    isa_attn_items(
        q, k, v, out, kbar, vbar, log2n, starts, counts,
        w_bh.to(torch.int32).contiguous(), w_qb.contiguous(), w_loff.contiguous(), w_llen.to(torch.int32).contiguous(), cp.kv_list.reshape(-1),
        block_size=cp.blocks.block_size, scale=scale,
    )


def _run_exact_sdpa(q, k, v, out, kbar, vbar, log2n, starts, counts, cp: CompactPlan, scale, mem_budget_bytes):
    B, N, H, D = q.shape
    bs = cp.blocks.block_size
    dev = q.device
    kmax = cp.kv_list.shape[-1]
    # group heads with equal (query blocks, common full prefix): one dense problem per group chunk
    groups = {}
    for h in range(H):
        groups.setdefault((cp.host["nq_exact"][h], cp.host["full_min"][h]), []).append(h)
    item_bytes = q.element_size() * D
    leftovers = []
    # once per call for every chunk: the exact query blocks of all heads (the first nq of a head's row
    # are its own selection: a head has at most nq exact blocks) and, per common prefix F, the rest
    # lengths of the KV' lists; chunks take slices, so they launch few host ops
    nq_all = max((nq for (nq, F) in groups if nq > 0 and F > 0), default=0)
    if nq_all:
        qsel = _select_blocks(cp.exact_q, nq_all)  # [B, H, nq_all], -1 = padding
        qsel32 = qsel.clamp_min(0).to(torch.int32)
    rest_len = {}
    for (nq, F), heads in sorted(groups.items(), key=lambda kv: -kv[0][0] * (kv[0][1] + 1)):
        if nq == 0:
            continue
        if F == 0:
            leftovers.extend(heads)
            continue
        per_head = B * (2 * nq * bs + 2 * F * bs) * item_bytes
        hc = max(1, min(len(heads), int(mem_budget_bytes // max(1, per_head))))
        n_chunks = -(-len(heads) // hc)
        hc = -(-len(heads) // n_chunks)  # balance the chunks
        for c0 in range(0, len(heads), hc):
            hl = heads[c0 : c0 + hc]
            Hc = len(hl)
            hs, hs32 = _cached(("heads", tuple(hl), dev), lambda: (lambda t: (t, t.to(torch.int32)))(_to_dev(hl, dev)))
            if hl == list(range(hl[0], hl[0] + Hc)):
                hsl = slice(hl[0], hl[0] + Hc)
                q_blocks, q_blocks32, kvb = qsel[:, hsl, :nq], qsel32[:, hsl, :nq], cp.kv_list[:, hsl, :F]  # views
            else:
                q_blocks, q_blocks32, kvb = qsel[:, hs, :nq], qsel32[:, hs, :nq], cp.kv_list[:, hs, :F]
            (qg,) = gather_blocks_triton(q, blist=q_blocks32, heads=hs32, starts=starts, counts=counts, block_size=bs)
            if k.stride() == v.stride():
                kg, vg = gather_blocks_triton(k, v, blist=kvb, heads=hs32, starts=starts, counts=counts, block_size=bs)
            else:
                (kg,) = gather_blocks_triton(k, blist=kvb, heads=hs32, starts=starts, counts=counts, block_size=bs)
                (vg,) = gather_blocks_triton(v, blist=kvb, heads=hs32, starts=starts, counts=counts, block_size=bs)
            og, lse = sdpa_with_lse(qg, kg, vg, scale)
            del qg, kg, vg
            # finishing items: fold in kv_list[F:kv_len] and scatter rows back to their tokens
            def make_items(og_strides=og.stride()):
                bb = torch.arange(B, device=dev).view(B, 1, 1).expand(B, Hc, nq).reshape(-1)
                hh = torch.arange(Hc, device=dev).view(1, Hc, 1).expand(B, Hc, nq).reshape(-1)
                rr = torch.arange(nq, device=dev).view(1, 1, nq).expand(B, Hc, nq).reshape(-1)
                w_bh = bb * H + hs[hh]
                w_ioff = bb * og_strides[0] + hh * og_strides[1] + rr * bs * og_strides[2]
                w_irow = (bb * Hc + hh) * (nq * bs) + rr * bs
                return w_bh, w_bh.to(torch.int32), (w_bh * kmax + F).contiguous(), w_ioff.contiguous(), w_irow.contiguous()

            w_bh, w_bh32, w_loff, w_ioff, w_irow = _cached(("sdpa", B, H, tuple(hl), nq, F, kmax, bs, og.stride(), dev), make_items)
            w_qb = q_blocks.reshape(-1)
            if F not in rest_len:
                rest_len[F] = (cp.kv_len - F).reshape(-1)
            w_llen = rest_len[F][w_bh]
            isa_attn_items(
                q, k, v, out, kbar, vbar, log2n, starts, counts,
                w_bh32, w_qb, w_loff, w_llen, cp.kv_list.reshape(-1),
                block_size=bs, scale=scale,
                init_o=og, init_lse=lse, w_ioff=w_ioff, w_irow=w_irow,
                init_row_stride=og.stride(2),
            )
            del og, lse
    if leftovers:
        _run_exact_triton(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, scale, heads=leftovers)


def execute_compact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: CompactPlan,
    scale: Optional[float] = None,
    exact_backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ISA attention for q, k, v [B, N, H, D] according to the plan ``cp``.

    Args:
        q, k, v: [B, N, H, D] with a unit stride on D (the plan's inputs).
        cp: a :class:`~isa_plugin.kernels.compact.CompactPlan` for these inputs; deferred Taylor selections
            are computed here, after the exact group is queued.
        scale: softmax scale (default 1/sqrt(D)).
        exact_backend: ``"sdpa"`` (cuDNN on gathered tensors, CUDA fp16/bf16 only), ``"triton"``, or
            ``"auto"`` (sdpa where allowed).
        out: optional [B, N, H, D] output buffer (every element is written).

    Returns:
        [B, N, H, D] in q's dtype.

    Raises:
        ValueError: an unknown ``exact_backend``.

    Example:
        >>> out = execute_compact(q, k, v, plan_compact(q, k, layout, cfg, v=v, defer_selections=True))  # doctest: +SKIP
    """
    B, N, H, D = q.shape
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    if cp.block_meta is not None:
        starts, counts, log2n = cp.block_meta
    else:
        blocks = cp.blocks.to(dev)
        starts = blocks.starts.to(torch.int32)
        counts = blocks.counts.to(torch.int32)
        log2n = torch.log2(blocks.counts.to(torch.float32)).contiguous()
    if out is None:
        out = torch.empty_like(q)
    kbar, vbar = cp.pooled_kv if cp.pooled_kv is not None else _pooled_kv(k, v, cp, starts, counts)
    bs = cp.blocks.block_size
    if exact_backend not in ("auto", "sdpa", "triton"):
        raise ValueError(f"exact_backend={exact_backend!r}; supported: 'auto', 'sdpa', 'triton'")
    use_sdpa = (exact_backend == "sdpa" or (exact_backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))) and bs & (bs - 1) == 0
    # the exact group needs only steps 1-6 of the plan: queue it first, so that the host work of
    # step 7 (Taylor selections, when deferred) overlaps the long exact-attention kernels
    if use_sdpa:
        budget = k.numel() * k.element_size()
        _run_exact_sdpa(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, sc, budget)
    else:
        _run_exact_triton(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, sc)
    cp.finish_selections()
    _run_taylor(q, k, v, out, kbar, vbar, log2n, starts, counts, cp, sc)
    return out
