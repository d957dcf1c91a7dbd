"""FlexAttention executor: runs any :class:`~isa_plugin.plan.BlockPlan` in one FlexAttention call.

Layout: q, k, v [B, N, H, D] in, [B, N, H, D] out. Every block (per-span blocking, size b) is copied into
its own b-token tile of a padded [B, H, nb·b, D] sequence, so blocks are Flex tiles of b × b. The keys are
the padded tokens followed by the pseudo-keys: the sub-block means (``plan.pseudo_block`` tokens) of each
head's KV' blocks, compacted per (batch, head) in block order (sub-blocks of one block contiguous),
zero-padded to a whole tile. One FlexAttention call then runs the plan:

- token tile (i, j) is listed when block j is exact for query block i: *full* when block j has b tokens,
  *partial* (the ``mask_mod`` masks key padding) when it is a short last block of its span;
- pseudo-key tile t is listed (partial) for query block i when one of its pseudo-keys belongs to a KV'
  block that is not exact for i; the ``mask_mod`` keeps exactly those pseudo-keys;
- the ``score_mod`` adds ln(token count) to pseudo-key scores (the count bias).

:func:`flex_prepare` pads the inputs and pools them (block means for a planner, sub-block means for the
pseudo-keys) in one pass; :func:`execute_flex` builds the block tables from the plan with torch ops on the
device (no dense mask evaluation, no host synchronisation). On CUDA the attention runs through
``torch.compile(flex_attention)`` (b = 128: Flex's default 128 × 128 tiles; b = 64: 64 × 64 kernel tiles);
on CPU it runs eagerly (tests).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import BlockLayout
from ..plan import BlockPlan
from .pseudo import kmeans_slots

__all__ = ["FlexInputs", "flex_prepare", "execute_flex", "build_flex_inputs", "FLEX_BLOCK_SIZES", "flex_ineligible"]

FLEX_BLOCK_SIZES = (64, 128)  # b values the CUDA path compiles for (CPU: any)


def flex_ineligible(q: torch.Tensor, block_size: int) -> Optional[str]:
    """Why the FlexAttention executor cannot serve this call, or None when it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover
        return f"torch {torch.__version__} has no FlexAttention"
    if q.is_cuda and block_size not in FLEX_BLOCK_SIZES:
        return f"block_size={block_size} (the FlexAttention executor supports {list(FLEX_BLOCK_SIZES)} on CUDA)"
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (FlexAttention on CUDA takes float16, bfloat16 or float32)"
    return None


@functools.lru_cache(maxsize=32)
def _padding(blocks: BlockLayout, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dst [N]: padded position of each token, key_valid [nb·b]: padded position holds a token)."""
    b = blocks.block_size
    bl = blocks.to(device)
    tb = bl.token_block
    dst = tb * b + (torch.arange(tb.numel(), device=device) - bl.starts[tb])
    valid = torch.zeros(blocks.num_blocks * b, dtype=torch.bool, device=device)
    valid[dst] = True
    return dst, valid


def _pad(x: torch.Tensor, dst: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[B, N, H, D] -> [B, H, n_pad, D] with token t at ``dst[t]`` and zeros elsewhere."""
    B, N, H, D = x.shape
    out = x.new_zeros(B, H, n_pad, D)
    out.index_copy_(2, dst, x.permute(0, 2, 1, 3))
    return out


@dataclass
class FlexInputs:
    """The padded inputs and pooled means of one call (:func:`flex_prepare`).

    ``qbar``, ``kbar`` [B, H, nb, D] (compute dtype) are the block means a planner takes; ``ksub``, ``vsub``
    [B, H, nb·r, D] the pseudo-key slots (r = block_size / pseudo_block: sub-block means, or k-means
    centroids and their values) and ``slot_cnt`` [B, H, nb·r] their token counts (0: an empty slot).
    """

    blocks: BlockLayout
    pseudo_block: int
    pseudo_keys: str
    q_pad: torch.Tensor
    k_pad: torch.Tensor
    v_pad: torch.Tensor
    qbar: torch.Tensor
    kbar: torch.Tensor
    ksub: torch.Tensor
    vsub: torch.Tensor
    slot_cnt: torch.Tensor
    dst: torch.Tensor
    key_valid: torch.Tensor


def flex_prepare(q, k, v, blocks: BlockLayout, pseudo_block: int, pseudo_keys: str = "mean") -> FlexInputs:
    """Pad q, k, v [B, N, H, D] block by block and pool them (block means and the pseudo-key slots of
    ``pseudo_keys``, :mod:`.pseudo`).

    Raises:
        ValueError: ``pseudo_block`` does not divide the block size.
    """
    B, N, H, D = q.shape
    dev = q.device
    b, s = blocks.block_size, int(pseudo_block)
    if s < 1 or b % s:
        raise ValueError(f"pseudo_block={pseudo_block} must divide block_size={b}")
    blocks = blocks.to(dev)
    nb = blocks.num_blocks
    n_pad = nb * b
    dst, key_valid = _padding(blocks, str(dev))
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_pad, k_pad, v_pad = (_pad(x, dst, n_pad) for x in (q, k, v))
    cnt = blocks.counts.to(ct)
    r = b // s
    slot_cnt = (blocks.counts[:, None] - torch.arange(r, device=dev)[None, :] * s).clamp(0, s).reshape(-1)  # [nb·r]
    ksub = k_pad.view(B, H, nb * r, s, D).to(ct).sum(3)
    qbar = q_pad.view(B, H, nb, b, D).to(ct).sum(3) / cnt[:, None]
    kbar = ksub.view(B, H, nb, r, D).sum(3) / cnt[:, None]
    if pseudo_keys == "mean" or r == 1:
        ksub = ksub / slot_cnt.clamp(min=1).to(ct)[:, None]
        vsub = v_pad.view(B, H, nb * r, s, D).to(ct).sum(3) / slot_cnt.clamp(min=1).to(ct)[:, None]
        slot_cnt = slot_cnt.expand(B, H, -1)
    else:
        cent, vals, cnt_s = kmeans_slots(k_pad.view(B, H, nb, b, D).to(ct), v_pad.view(B, H, nb, b, D).to(ct),
                                         key_valid.view(nb, b), s)
        ksub, vsub, slot_cnt = cent.reshape(B, H, nb * r, D), vals.reshape(B, H, nb * r, D), cnt_s.reshape(B, H, nb * r).long()
    return FlexInputs(blocks, s, pseudo_keys, q_pad, k_pad, v_pad, qbar, kbar, ksub, vsub, slot_cnt, dst, key_valid)


def build_flex_inputs(q, k, v, plan: BlockPlan, prepared: Optional[FlexInputs] = None):
    """Everything one FlexAttention call needs to run ``plan`` (see the module docstring).

    Returns:
        ``(q_pad, kv_k, kv_v, block_mask, score_mod, mask_mod, dst, poison)``: q [B, H, nb·b, D]; keys and
        values [B, H, nb·b + P, D]; the Flex ``BlockMask``; the two Flex callables; the padded position of
        each token [N]; and a [B, H, 1, D] zero tensor that is NaN where k or v hold non-finite values (added
        to the output).
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, N, H, D = q.shape
    dev = q.device
    blocks = plan.blocks.to(dev)
    if prepared is None or (prepared.pseudo_block, prepared.pseudo_keys) != (plan.pseudo_block, plan.pseudo_keys):
        prepared = flex_prepare(q, k, v, blocks, plan.pseudo_block, plan.pseudo_keys)
    b, s = blocks.block_size, plan.pseudo_block
    nb = blocks.num_blocks
    n_pad = nb * b
    ct = prepared.ksub.dtype
    q_pad, k_pad, v_pad = prepared.q_pad, prepared.k_pad, prepared.v_pad
    ksub, vsub, slot_cnt, dst, key_valid = prepared.ksub, prepared.vsub, prepared.slot_cnt, prepared.dst, prepared.key_valid
    r = b // s
    poison = (ksub.sum(dim=(2, 3)) * 0)[:, :, None, None] + (vsub.sum(dim=2) * 0)[:, :, None, :]
    # pseudo-keys: the sub-blocks of each head's KV' blocks, compacted in block order
    slot_parent = torch.arange(nb, device=dev).repeat_interleave(r)  # [nb·r]
    slot_ok = plan.kv_keep[:, :, slot_parent] & (slot_cnt > 0)  # [B, H, nb·r]
    order = torch.argsort((~slot_ok).to(torch.int8), dim=-1, stable=True)
    n_ps = slot_ok.sum(-1)  # [B, H]
    n_slots = nb * r
    # the pseudo-key region has one length per (N, b) for every s >= 16, so a compiled kernel serves every
    # pseudo-key size (the length is baked into it); tiles past the last pseudo-key are never listed
    p_tiles = -(-max(n_slots, -(-n_pad // 16)) // b)
    p_len = p_tiles * b
    ps_valid = torch.zeros(B, H, p_len, dtype=torch.bool, device=dev)
    ps_valid[..., :n_slots] = torch.gather(slot_ok, -1, order)
    ps_parent = torch.zeros(B, H, p_len, dtype=torch.int64, device=dev)
    ps_parent[..., :n_slots] = slot_parent[order]
    ps_log = torch.zeros(B, H, p_len, dtype=ct, device=dev)
    ps_log[..., :n_slots] = torch.log(torch.gather(slot_cnt, -1, order).clamp(min=1).to(ct))
    pk = torch.zeros(B, H, p_len, D, dtype=q.dtype, device=dev)
    pv = torch.zeros_like(pk)
    pk[:, :, :n_slots] = torch.gather(ksub, 2, order[..., None].expand(B, H, n_slots, D)).to(q.dtype)
    pv[:, :, :n_slots] = torch.gather(vsub, 2, order[..., None].expand(B, H, n_slots, D)).to(q.dtype)
    kv_k = torch.cat([k_pad, pk], dim=2)
    kv_v = torch.cat([v_pad, pv], dim=2)

    # block tables
    exact = plan.exact_mask()  # [B, H, nb, nb]
    full_blk = blocks.counts == b
    tok_full = exact & full_blk
    tok_part = exact & ~full_blk
    # pseudo tile t holds compacted pseudo-keys [t·b, min((t+1)·b, n_ps) - 1]; their parents are the KV'
    # blocks p0..p1 (contiguous in the compacted order); the tile is needed iff one of them is not exact
    t0 = torch.arange(p_tiles, device=dev) * b
    live = t0[None, None, :] < n_ps[..., None]  # [B, H, Pt]
    last = torch.minimum(t0[None, None, :] + b - 1, (n_ps[..., None] - 1).clamp(min=0))
    p0 = torch.gather(ps_parent, -1, t0[None, None, :].expand(B, H, p_tiles))
    p1 = torch.gather(ps_parent, -1, last)
    keep_cum = torch.cumsum(plan.kv_keep.to(torch.int32), -1)  # [B, H, nb]
    keep_in = torch.gather(keep_cum, -1, p1) - torch.gather(keep_cum, -1, p0) + 1  # kept blocks in [p0, p1]
    ex_cum = torch.cumsum(exact.to(torch.int32), -1)  # [B, H, nb, nb]
    ex0 = torch.gather(ex_cum, -1, p0[:, :, None, :].expand(B, H, nb, p_tiles))
    ex1 = torch.gather(ex_cum, -1, p1[:, :, None, :].expand(B, H, nb, p_tiles))
    ex_first = torch.gather(exact, -1, p0[:, :, None, :].expand(B, H, nb, p_tiles)).to(torch.int32)
    ex_in = ex1 - ex0 + ex_first
    ps_part = live[:, :, None, :] & (ex_in < keep_in[:, :, None, :])  # [B, H, nb, Pt]
    partial = torch.cat([tok_part, ps_part], dim=-1)
    full = torch.cat([tok_full, torch.zeros_like(ps_part)], dim=-1)

    def table(m):
        return m.sum(-1, dtype=torch.int32), torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    kv_num, kv_idx = table(partial)
    full_num, full_idx = table(full)

    def mask_mod(bi, hi, q_idx, kv_idx):
        qb = q_idx // b
        is_tok = kv_idx < n_pad
        kb = torch.clamp(kv_idx // b, max=nb - 1)
        tok_ok = key_valid[torch.clamp(kv_idx, max=n_pad - 1)] & exact[bi, hi, qb, kb]
        pi = torch.clamp(kv_idx - n_pad, min=0, max=p_len - 1)
        ps_ok = ps_valid[bi, hi, pi] & ~exact[bi, hi, qb, ps_parent[bi, hi, pi]]
        return torch.where(is_tok, tok_ok, ps_ok)

    def score_mod(score, bi, hi, q_idx, kv_idx):
        pi = torch.clamp(kv_idx - n_pad, min=0, max=p_len - 1)
        return torch.where(kv_idx >= n_pad, score + ps_log[bi, hi, pi], score)

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=b, mask_mod=mask_mod,
                                  seq_lengths=(n_pad, n_pad + p_len))
    return q_pad, kv_k, kv_v, bm, score_mod, mask_mod, dst, poison


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _run_flex(q_pad, kv_k, kv_v, bm, score_mod, scale: float, block_size: int):
    from torch.nn.attention.flex_attention import flex_attention

    if q_pad.is_cuda:
        opts = None if block_size == 128 else {"BLOCK_M": block_size, "BLOCK_N": block_size}
        return _compiled_flex()(q_pad, kv_k, kv_v, score_mod=score_mod, block_mask=bm, scale=scale, kernel_options=opts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q_pad, kv_k, kv_v, score_mod=score_mod, block_mask=bm, scale=scale)


def execute_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: Optional[float] = None,
                 prepared: Optional[FlexInputs] = None) -> torch.Tensor:
    """Run ``plan`` for q, k, v [B, N, H, D] through one FlexAttention call (compiled on CUDA, eager on CPU).

    Args:
        q, k, v: [B, N, H, D], same shape and dtype.
        plan: any :class:`~isa_plugin.plan.BlockPlan` (of batch B, H heads).
        scale: softmax scale, default 1/sqrt(D).
        prepared: :func:`flex_prepare`'s result for these inputs (computed when None).

    Returns:
        [B, N, H, D] in q's dtype: :func:`~isa_plugin.kernels.reference.execute_plan_reference`'s semantics
        up to rounding.

    Raises:
        ValueError: shapes that differ, or a call the executor cannot serve (:func:`flex_ineligible`).

    Example:
        >>> out = execute_flex(q, k, v, plan)  # doctest: +SKIP
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one [B, N, H, D] shape and dtype; got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    why = flex_ineligible(q, plan.blocks.block_size)
    if why is not None:
        raise ValueError(f"the FlexAttention executor cannot serve this call: {why}")
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_pad, kv_k, kv_v, bm, score_mod, _, dst, poison = build_flex_inputs(q, k, v, plan, prepared)
    o = _run_flex(q_pad, kv_k, kv_v, bm, score_mod, sc, plan.blocks.block_size)  # [B, H, nb·b, D]
    return (o[:, :, dst] + poison.to(o.dtype)).permute(0, 2, 1, 3).contiguous()
