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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ISAConfig
from ..layout import CONTEXT, TARGET, TEXT, BlockLayout
from .reference import ISAPlan, _ceil_count

__all__ = ["CompactPlan", "plan_compact", "plan_compact_from_pooled", "compact_from_reference", "compact_to_reference"]


@dataclass
class CompactPlan:
    """Index-list form of an ISA plan (see the module docstring for the fields)."""

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

    @property
    def shape(self):
        return tuple(self.kv_keep.shape)

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


def _kv_lists(kv_keep: torch.Tensor, blocks: BlockLayout):
    B, H, nb = kv_keep.shape
    dev = kv_keep.device
    idx = torch.arange(nb, device=dev)
    short = blocks.counts.to(dev) < blocks.block_size
    key = (~kv_keep).long() * (2 * nb) + short.long() * nb + idx
    order = torch.argsort(key, dim=-1)
    kv_len = kv_keep.sum(-1)
    kmax = max(1, int(kv_len.max()))
    kv_list = order[..., :kmax]
    kv_full = (kv_keep & ~short).sum(-1)
    return kv_list, kv_len, kv_full


def _build(kv_keep, exact_q, kv_list, kv_len, kv_full, sel_pos, blocks, sharp=None, sal=None, sel_first=None) -> CompactPlan:
    """sel_pos [B, H, nb, Kmax] bool: non-text KV' positions computed exactly by Taylor query blocks.

    ``sel_first`` [B, H, nb, s] (optional): those positions, selected ones first in each row, when the
    caller already has them (saves a top-k).
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
    s_max = max(1, int(n_sel.max()) if n_sel.numel() else 1)
    # positions of the selected entries first (ascending position for a stable, cache-friendly order)
    if sel_first is None:
        key = (~sel_pos).long() * kmax + pos
        sel_first = torch.topk(key, min(s_max, kmax), dim=-1, largest=False, sorted=True).indices  # [B, H, nb, s]
    first = sel_first
    sel_blocks = torch.gather(kv_list[:, :, None, :].expand(B, H, nb, kmax), -1, first)
    text_ids = torch.nonzero(is_x).squeeze(1)
    n_text = int(text_ids.numel())
    # text ids first (the same for every row), then each row's n_sel selected ids
    tsel = torch.cat([text_ids.view(1, 1, 1, -1).expand(B, H, nb, n_text), sel_blocks], dim=-1)
    tsel_len = (n_sel + n_text).to(torch.int32)
    # text KV' blocks are always exact; only non-text, unselected KV' blocks are pseudo-keys
    approx = nontext_valid[:, :, None, :] & ~sel_pos
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
    )


def _rank_mask(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mark the ``count`` (broadcast over the last dim) highest scores along the last dim."""
    n = scores.shape[-1]
    kmax = int(count.max()) if count.numel() else 0
    kmax = min(max(kmax, 0), n)
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return out
    top = torch.topk(scores, kmax, dim=-1, largest=True, sorted=True).indices
    r = torch.arange(kmax, device=scores.device)
    out.scatter_(-1, top, r < count.unsqueeze(-1))
    return out


def plan_compact_from_pooled(qbar, kbar, blocks: BlockLayout, config: ISAConfig, scale: float) -> CompactPlan:
    """Steps 3-7 of ISA from block means q̄, k̄ [B, H, nb, D] (float32), as index lists."""
    B, H, nb, _ = qbar.shape
    dev = qbar.device
    blocks = blocks.to(dev)
    ratios = config.per_head(H, device=dev)
    kinds = blocks.kinds
    is_t, is_c, is_x = kinds == TARGET, kinds == CONTEXT, kinds == TEXT
    t_idx = torch.nonzero(is_t).squeeze(1)
    c_idx = torch.nonzero(is_c).squeeze(1)
    nt_idx = torch.nonzero(~is_x).squeeze(1)

    logits = torch.matmul(qbar, kbar.transpose(-1, -2)).mul_(scale)  # [B, H, nb, nb]
    P = torch.softmax(logits, dim=-1)

    # step 4: context pre-selection
    saliency = torch.zeros(B, H, nb, device=dev, dtype=torch.float32)
    kv_keep = (~is_c).expand(B, H, nb).clone()
    if c_idx.numel():
        sal_c = torch.matmul(is_t.to(P.dtype), P[..., c_idx])  # [B, H, C]
        saliency[..., c_idx] = sal_c.float()
        cnt = _ceil_count(ratios["alpha_s"], torch.tensor(int(c_idx.numel()), device=dev))  # [H]
        keep_c = _rank_mask(sal_c, cnt[None, :, None].expand(B, H, 1).squeeze(-1))
        kv_keep[..., c_idx] = keep_c

    # step 5: sharpness
    if config.sharpness == "topk_mass":
        kk = max(1, int(math.floor(config.topk_fraction * int(t_idx.numel()) + 1e-9)))
        sharp = P[..., t_idx].topk(kk, dim=-1).values.sum(-1)
    else:
        sharp = (P * P).sum(-1)
    del P
    sharp = sharp.masked_fill(is_x, float("inf"))

    # step 6: grouping
    exact_q = is_x.expand(B, H, nb).clone()
    cnt_f = _ceil_count(ratios["alpha_f"], torch.tensor(int(nt_idx.numel()), device=dev))  # [H]
    exact_q[..., nt_idx] = _rank_mask(sharp[..., nt_idx], cnt_f[None, :].expand(B, H))

    # step 7: Taylor selections among the non-text KV' blocks, by pooled logits
    kv_list, kv_len, kv_full = _kv_lists(kv_keep, blocks)
    kmax = kv_list.shape[-1]
    pos = torch.arange(kmax, device=dev)
    cand = (pos < kv_len.unsqueeze(-1)) & ~is_x[kv_list]  # [B, H, Kmax]
    k_prime = cand.sum(-1)  # [B, H]
    n_exact = _ceil_count(ratios["alpha_ns"][None, :], k_prime)  # [B, H]
    lg = torch.gather(logits, -1, kv_list[:, :, None, :].expand(B, H, nb, kmax))
    del logits
    lg.masked_fill_(~cand[:, :, None, :], float("-inf"))
    s_max = min(int(n_exact.max()), kmax)
    top = torch.topk(lg, s_max, dim=-1, largest=True, sorted=True).indices  # [B, H, nb, s_max]
    del lg
    sel_pos = torch.zeros(B, H, nb, kmax, dtype=torch.bool, device=dev)
    sel_pos.scatter_(-1, top, (torch.arange(s_max, device=dev) < n_exact[:, :, None, None]).expand(B, H, nb, s_max))
    return _build(kv_keep, exact_q, kv_list, kv_len, kv_full, sel_pos, blocks, sharp.float(), saliency, sel_first=top)


def plan_compact(q, k, layout, config: ISAConfig, scale: Optional[float] = None) -> CompactPlan:
    """Steps 1-7 of ISA for q, k [B, N, H, D]: Triton pooling, then :func:`plan_compact_from_pooled`."""
    from .pooling import pool_blocks_triton

    blocks = layout.blocks(config.block_size).to(q.device)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qbar, kbar = pool_blocks_triton(
        q, k, starts=blocks.starts.to(torch.int32), counts=blocks.counts.to(torch.int32), block_size=config.block_size
    ) if q.stride() == k.stride() else (
        pool_blocks_triton(q, starts=blocks.starts.to(torch.int32), counts=blocks.counts.to(torch.int32), block_size=config.block_size)[0],
        pool_blocks_triton(k, starts=blocks.starts.to(torch.int32), counts=blocks.counts.to(torch.int32), block_size=config.block_size)[0],
    )
    return plan_compact_from_pooled(qbar, kbar, blocks, config, sc)


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
