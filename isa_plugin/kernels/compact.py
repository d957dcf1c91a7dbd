"""The Triton executor's plan form: index lists its kernels walk (:class:`CompactPlan`).

A :class:`~isa_plugin.plan.BlockPlan` holds CSR lists per query block; the Triton executor
(:mod:`~isa_plugin.kernels.executor`) groups the query blocks whose list is all of KV' (full rows: one
dense-attention group over each (b, h)'s KV' list) and walks the others' lists. :class:`CompactPlan` holds,
per (batch, head):

- ``kv_list`` [B, H, Kmax] int32: the KV' blocks (target, text, kept context), full-size blocks first
  (ascending), then short ones (ascending); ``kv_len`` [B, H] entries are valid, the first ``kv_full``
  of them are full-size blocks. The exact group may hand a common prefix of full blocks to cuDNN and walk
  the rest itself.
- ``exact_q`` [B, H, nb] bool: query blocks of the exact group (full rows).
- ``tsel`` [B, H, nb, S] int32 and ``tsel_len`` [B, H, nb]: for the other query blocks, their exact KV'
  blocks (every text block first, then the selected non-text blocks).
- ``approx`` [B, H, nb, Kmax] int8: 1 where the KV' block at that ``kv_list`` position enters the query
  block as a block-mean pseudo-key.

:func:`compact_from_block_plan` / :func:`compact_to_block_plan` convert between the two forms; a selection
mode with a GPU planner for this executor builds a :class:`CompactPlan` directly (the fixed mode:
:func:`isa_plugin.selection.fixed_gpu.plan_compact`).

Deferred selections: the exact group needs only the KV' lists and the grouping. A planner may leave the
per-row selections pending (:attr:`CompactPlan.pending`); the executor calls
:meth:`CompactPlan.finish_selections` after queueing the exact group, so that host work overlaps the long
exact-attention kernels instead of delaying their launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from ..layout import TEXT, BlockLayout
from ..plan import BlockPlan

__all__ = ["CompactPlan", "PendingSelections", "select_blocks", "compact_from_block_plan", "compact_to_block_plan",
           "kv_lists", "build_compact"]


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
            pending, self.pending = self.pending, None
            pending.finish(self, pending, use_kernel)
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
    """What the Taylor selections of a deferred plan need besides the plan's own lists.

    ``finish(plan, pending, use_kernel)`` computes them (the planner that deferred them provides it);
    ``logits`` [B, H, nb, nb]: the scaled pooled logits q̄·k̄ᵀ; ``static``: the planner's cached
    layout- and settings-derived counts and index tensors.
    """

    finish: Callable
    logits: torch.Tensor
    static: Any


def kv_lists(kv_keep: torch.Tensor, blocks: BlockLayout, kmax: Optional[int] = None):
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


def build_compact(kv_keep, exact_q, kv_list, kv_len, kv_full, sel_pos, blocks, sharp=None, sal=None, sel_first=None, s_max=None, host=None, text_ids=None) -> CompactPlan:
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


def select_blocks(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Per (b, h), the first ``count`` block ids where ``mask`` [B, H, nb] is True (ascending), padded
    with -1 where a row has fewer: [B, H, count] int64. No host synchronisation."""
    B, H, nb = mask.shape
    ar = torch.arange(nb, device=mask.device)
    key = (~mask).long() * nb + ar
    idx = torch.topk(key, count, dim=-1, largest=False, sorted=True).indices
    ok = torch.gather(mask, -1, idx)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def compact_from_block_plan(plan: BlockPlan) -> CompactPlan:
    """Convert a :class:`~isa_plugin.plan.BlockPlan` with one pseudo-key per block into a :class:`CompactPlan`:
    full rows form the exact group, every other row walks its own list of exact KV' blocks."""
    if plan.pseudo_block != plan.blocks.block_size:
        raise ValueError(f"a CompactPlan has one pseudo-key per block; this plan has pseudo_block={plan.pseudo_block} "
                         f"< block_size={plan.blocks.block_size} (convert with plan.at_pseudo_granularity() first)")
    blocks = plan.blocks
    kv_keep = plan.kv_keep
    exact_kv = plan.exact_mask()
    B, H, nb = kv_keep.shape
    kv_list, kv_len, kv_full = kv_lists(kv_keep, blocks)
    kmax = kv_list.shape[-1]
    exact_q = plan.full_rows
    sel_pos = torch.gather(exact_kv, -1, kv_list[:, :, None, :].expand(B, H, nb, kmax))
    sel_pos = sel_pos & ~exact_q[..., None]
    return build_compact(kv_keep, exact_q.clone(), kv_list, kv_len, kv_full, sel_pos, blocks,
                  plan.diagnostics.get("sharpness"), plan.diagnostics.get("saliency"))


def compact_to_block_plan(cp: CompactPlan) -> BlockPlan:
    """Convert a :class:`CompactPlan` into a :class:`~isa_plugin.plan.BlockPlan` (the form the reference executor runs)."""
    B, H, nb = cp.kv_keep.shape
    dev = cp.kv_keep.device
    S = cp.tsel.shape[-1]
    valid = torch.arange(S, device=dev) < cp.tsel_len.unsqueeze(-1)
    tay = torch.zeros(B, H, nb, nb + 1, dtype=torch.bool, device=dev)
    idx = torch.where(valid, cp.tsel.long(), torch.full_like(cp.tsel.long(), nb))
    tay.scatter_(-1, idx, True)
    tay = tay[..., :nb]
    exact_kv = torch.where(cp.exact_q[..., None], cp.kv_keep[:, :, None, :], tay)
    diag = {k: t for k, t in (("sharpness", cp.sharpness), ("saliency", cp.saliency)) if t is not None}
    return BlockPlan.from_masks(cp.blocks, cp.kv_keep, exact_kv, cp.blocks.block_size, diag)
