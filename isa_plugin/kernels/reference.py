"""Pure-PyTorch reference executor: the specification every executor is tested against.

Tensor layout follows diffusers: q, k, v are [B, N, H, D] (sequence before heads); the output is
[B, N, H, D] in q's dtype. Math runs in float32 (float64 when given float64).

:func:`execute_plan_reference` runs any :class:`~isa_plugin.plan.BlockPlan`, per (batch, head) and query
block i: exact attention to the tokens of the key blocks in i's list, plus, for every other KV' block, the
means of its sub-blocks of ``plan.pseudo_block`` tokens as pseudo-keys (value: the sub-block mean of v;
logit bias ln(its token count)), or with ``plan.pseudo_keys == "kmeans"`` the k-means centroids of its keys
(:mod:`.pseudo`), all in one softmax. With one pseudo-key per block that is ISA's 0th-order
Taylor branch (``ISA.md`` §2, step 7). Selection modes (:mod:`isa_plugin.selection`) make the plans.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..layout import BlockLayout
from ..plan import BlockPlan
from .pseudo import kmeans_slots, padded_blocks

__all__ = ["dense_attention_reference", "pool_blocks", "plan_pseudo_keys", "execute_plan_reference"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def dense_attention_reference(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """Plain softmax attention in [B, N, H, D] layout, math in fp32 (fp64 for fp64 inputs)."""
    ct = _compute_dtype(q)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * _scale(q, scale)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(ct)).to(q.dtype)


def pool_blocks(x: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """Block means of x [B, N, H, D] -> [B, H, nb, D] (compute dtype), dividing by true counts."""
    ct = _compute_dtype(x)
    B, N, H, D = x.shape
    blocks = blocks.to(x.device)
    out = torch.zeros(B, blocks.num_blocks, H, D, dtype=ct, device=x.device)
    out.index_add_(1, blocks.token_block, x.to(ct))
    out = out / blocks.counts.to(ct)[None, :, None, None]
    return out.permute(0, 2, 1, 3)


def plan_pseudo_keys(k, v, plan: BlockPlan, ct: torch.dtype):
    """The pseudo-keys of ``plan`` for k, v [B, N, H, D], in the compute dtype ``ct``.

    Returns:
        ``(plan', keys [B, H, P, D], values [B, H, P, D], log counts [B, H, P], C)``: a plan with ``"mean"``
        pseudo-keys comes at its pseudo-key granularity (:meth:`~isa_plugin.plan.BlockPlan.at_pseudo_granularity`)
        with one block mean per block (C = 1); a k-means plan as it is, with C = block_size / pseudo_block slots
        per block (:mod:`.pseudo`; an empty slot has log count −inf). Block j's pseudo-keys are [j·C, (j+1)·C).
    """
    if plan.mean_pseudo_keys:
        plan = plan.at_pseudo_granularity()
        blocks = plan.blocks.to(k.device)
        B, _, H, _ = k.shape
        log_n = torch.log(blocks.counts.to(ct)).expand(B, H, -1)
        return plan, pool_blocks(k, blocks), pool_blocks(v, blocks), log_n, 1
    k_blk, valid = padded_blocks(k, plan.blocks, ct)
    v_blk, _ = padded_blocks(v, plan.blocks, ct)
    cent, vals, cnt = kmeans_slots(k_blk, v_blk, valid, plan.pseudo_block)
    B, H, nb, C, D = cent.shape
    return plan, cent.reshape(B, H, nb * C, D), vals.reshape(B, H, nb * C, D), torch.log(cnt.reshape(B, H, nb * C)), C


def execute_plan_reference(
    q, k, v, plan: BlockPlan, scale: Optional[float] = None, max_chunk_elems: int = 1 << 25
) -> torch.Tensor:
    """Run attention according to ``plan``: exact pairs plus pseudo-keys, one softmax.

    Args:
        q, k, v: [B, N, H, D].
        plan: a :class:`~isa_plugin.plan.BlockPlan` (any selection mode's).
    Returns:
        [B, N, H, D] in q's dtype. A non-finite value anywhere in k or v of a (batch, head) makes that
        head's output NaN (for v, the affected feature columns), as in dense attention.
    """
    ct = _compute_dtype(q)
    sc = _scale(q, scale)
    B, N, H, D = q.shape
    plan, kps, vps, log_c, C = plan_pseudo_keys(k, v, plan, ct)  # sub-block means: the plan over the sub-blocks
    blocks = plan.blocks.to(q.device)
    qh = q.to(ct).permute(0, 2, 1, 3)
    kh = k.to(ct).permute(0, 2, 1, 3)
    vh = v.to(ct).permute(0, 2, 1, 3)
    tb = blocks.token_block
    exact_kv = plan.exact_mask()
    approx = plan.approx_mask()
    out = torch.empty(B, H, N, D, dtype=ct, device=q.device)
    nb = blocks.num_blocks
    chunk = max(1, max_chunk_elems // max(1, H * (N + nb * C)))
    for b in range(B):
        for s0 in range(0, N, chunk):
            s1 = min(N, s0 + chunk)
            qb = tb[s0:s1]
            qc = qh[b, :, s0:s1]  # [H, T, D]
            s_tok = torch.einsum("htd,hnd->htn", qc, kh[b]) * sc
            m_tok = exact_kv[b][:, qb][:, :, tb]  # [H, T, N]
            s_tok = s_tok.masked_fill(~m_tok, float("-inf"))
            s_bar = torch.einsum("htd,hjd->htj", qc, kps[b]) * sc + log_c[b][:, None, :]
            a_m = approx[b][:, qb]  # [H, T, nb]
            s_bar = s_bar.masked_fill(~(a_m if C == 1 else a_m.repeat_interleave(C, -1)), float("-inf"))
            p = torch.softmax(torch.cat([s_tok, s_bar], dim=-1), dim=-1)
            out[b, :, s0:s1] = p[..., :N] @ vh[b] + p[..., N:] @ vps[b]
    # Dense attention turns a NaN/Inf anywhere in k or v into NaN outputs for the whole head, even when
    # ISA would have dropped that block; keep that behaviour (0 * non-finite = NaN, else 0).
    # A non-finite v element only poisons its own feature column, as in dense attention.
    kbar, vbar = (kps, vps) if C == 1 else (pool_blocks(k, blocks), pool_blocks(v, blocks))
    out += (kbar.sum(dim=(2, 3)) * 0)[:, :, None, None] + (vbar.sum(dim=2) * 0)[:, :, None, :]
    return out.permute(0, 2, 1, 3).to(q.dtype)
