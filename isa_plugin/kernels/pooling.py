"""Per-span block pooling: block means of q, k, v for ISA planning and the Taylor branch.

Layout:
    x: [B, N, H, D] (diffusers' layout; any strides with a unit stride on D), fp16 / bf16 / fp32.
    blocks: per-span blocks of a :class:`~isa_plugin.layout.BlockLayout`, given as ``starts`` and
        ``counts`` ([nb] int32); a block never straddles two spans and may be short.
    out: [B, H, nb, D] float32, the mean over the block's *true* count of tokens.

Grid: (nb, B * H, n_inputs). One program loads one block's [BLOCK, D] tile of one (batch, head) of
one input (rows are H*D elements apart) and writes its mean. (A variant walking [BT, HG, D] tiles of
HG heads per program ran 6x slower on an H200: 3.1 ms instead of 0.5 ms for k and v at N=65,536,
H=40.) Pooling reads every input once: 3 * B * N * H * D * itemsize bytes for q, k, v (0.7 ms for
2 GB on an H200, about 2.9 TB/s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pool_blocks_triton", "gather_blocks_triton"]


@triton.jit
def _pool_fwd_kernel(
    X0, X1, X2,  # up to three inputs [B, N, H, D] sharing strides
    O0, O1, O2,  # outputs [B, H, nb, D] float32 (contiguous)
    STARTS, COUNTS,  # [nb] int32
    sx_b, sx_n, sx_h,
    H, nb,
    D: tl.constexpr,  # head dim: a block-tile dimension, must be static
    BLOCK: tl.constexpr,  # padded block size (power of two >= block_size): static tile height
):
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_x = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H

    start = tl.load(STARTS + i_blk).to(tl.int64)
    count = tl.load(COUNTS + i_blk)
    o_t = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_t = o_t < count

    off = i_b.to(tl.int64) * sx_b + i_h.to(tl.int64) * sx_h + (start + o_t.to(tl.int64))[:, None] * sx_n + o_d[None, :]
    o_out = (i_bh.to(tl.int64) * nb + i_blk) * D + o_d
    if i_x == 0:
        b_x = tl.load(X0 + off, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        tl.store(O0 + o_out, tl.sum(b_x, axis=0) / count.to(tl.float32))
    elif i_x == 1:
        b_x = tl.load(X1 + off, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        tl.store(O1 + o_out, tl.sum(b_x, axis=0) / count.to(tl.float32))
    else:
        b_x = tl.load(X2 + off, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        tl.store(O2 + o_out, tl.sum(b_x, axis=0) / count.to(tl.float32))


def pool_blocks_triton(*xs: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, block_size: int):
    """Block means of one to three [B, N, H, D] tensors of one shape.

    Args:
        *xs: 1-3 tensors [B, N, H, D] with equal shapes and strides, unit stride on D.
        starts, counts: [nb] int32 on the same device, block starts and true token counts.
        block_size: nominal block size (every count is <= block_size).

    Returns:
        A list of [B, H, nb, D] float32 tensors, one per input.

    Raises:
        ValueError: shapes or strides that differ, a non-unit stride on D, or more than three inputs.
    """
    if not 1 <= len(xs) <= 3:
        raise ValueError(f"pool_blocks_triton takes 1 to 3 tensors, got {len(xs)}")
    x0 = xs[0]
    if x0.ndim != 4:
        raise ValueError(f"expected [B, N, H, D] inputs, got shape {tuple(x0.shape)}")
    for x in xs:
        if x.shape != x0.shape or x.stride() != x0.stride():
            raise ValueError("pool_blocks_triton inputs must share one shape and one set of strides")
        if x.stride(-1) != 1:
            raise ValueError("pool_blocks_triton needs a unit stride on the head dimension")
    B, N, H, D = x0.shape
    nb = int(starts.numel())
    outs = [torch.empty(B, H, nb, D, device=x0.device, dtype=torch.float32) for _ in xs]
    if nb == 0 or B * H == 0:
        return outs
    BLOCK = max(16, triton.next_power_of_2(int(block_size)))
    X = list(xs) + [x0] * (3 - len(xs))
    O = outs + [outs[0]] * (3 - len(outs))
    grid = (nb, B * H, len(xs))
    _pool_fwd_kernel[grid](
        X[0], X[1], X[2], O[0], O[1], O[2], starts, counts,
        x0.stride(0), x0.stride(1), x0.stride(2), H, nb,
        D=D, BLOCK=BLOCK, num_warps=4,
    )
    return outs


@triton.jit
def _gather_blocks_fwd_kernel(
    X0, X1, Y0, Y1,  # inputs [B, N, H, D] (shared strides); outputs [B, Hc, nblk * BLOCK, D] contiguous
    BLIST,  # [B, Hc, nblk] int32 block ids (strides sl_b, sl_h; unit stride on the last dim)
    HEADS,  # [Hc] int32 head of each output head slot
    STARTS, COUNTS,  # [nb] int32
    sx_b, sx_n, sx_h,
    sl_b, sl_h,
    Hc, nblk,
    D: tl.constexpr,  # head dim: tile width
    BLOCK: tl.constexpr,  # rows per block (the ISA block size, a power of two)
):
    i_j = tl.program_id(0)
    i_bhc = tl.program_id(1)
    i_x = tl.program_id(2)
    i_b = (i_bhc // Hc).to(tl.int64)
    i_h = tl.load(HEADS + i_bhc % Hc).to(tl.int64)
    i_blk = tl.load(BLIST + i_b * sl_b + (i_bhc % Hc).to(tl.int64) * sl_h + i_j)
    start = tl.load(STARTS + i_blk).to(tl.int64)
    count = tl.load(COUNTS + i_blk)
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    # rows past a short block's count repeat its last token (their outputs are never used)
    o_t = start + tl.minimum(o_r, count - 1).to(tl.int64)
    off_x = i_b * sx_b + i_h * sx_h + o_t[:, None] * sx_n + o_d[None, :]
    off_y = ((i_bhc.to(tl.int64) * nblk + i_j) * BLOCK + o_r.to(tl.int64))[:, None] * D + o_d[None, :]
    if i_x == 0:
        tl.store(Y0 + off_y, tl.load(X0 + off_x))  # [BLOCK, D]
    else:
        tl.store(Y1 + off_y, tl.load(X1 + off_x))  # [BLOCK, D]


def gather_blocks_triton(*xs: torch.Tensor, blist: torch.Tensor, heads: torch.Tensor, starts, counts, block_size: int):
    """Gather whole blocks of one or two [B, N, H, D] tensors into dense [B, Hc, nblk * block_size, D] copies.

    Args:
        *xs: one or two tensors [B, N, H, D] with equal strides and a unit stride on D.
        blist: [B, Hc, nblk] int32 block ids per (batch, output head), any strides with a unit stride on
            the last dim (a slice of a larger list needs no copy); heads: [Hc] int32 source heads.
        starts, counts: [nb] int32; block_size must be a power of two (rows of short blocks are padded
            with copies of the block's last token).

    Returns:
        A list of contiguous [B, Hc, nblk * block_size, D] tensors.
    """
    if not 1 <= len(xs) <= 2:
        raise ValueError("gather_blocks_triton takes one or two tensors")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two")
    x0 = xs[0]
    for x in xs:
        if x.stride() != x0.stride() or x.stride(-1) != 1:
            raise ValueError("gather_blocks_triton inputs must share strides with a unit stride on D")
    B, N, H, D = x0.shape
    _, Hc, nblk = blist.shape
    if nblk and blist.stride(-1) != 1:
        raise ValueError("gather_blocks_triton needs a unit stride on the last dim of blist")
    outs = [torch.empty(B, Hc, nblk * block_size, D, device=x0.device, dtype=x0.dtype) for _ in xs]
    if nblk == 0:
        return outs
    X = list(xs) + [x0] * (2 - len(xs))
    Y = outs + [outs[0]] * (2 - len(outs))
    _gather_blocks_fwd_kernel[(nblk, B * Hc, len(xs))](
        X[0], X[1], Y[0], Y[1], blist, heads, starts, counts,
        x0.stride(0), x0.stride(1), x0.stride(2), blist.stride(0), blist.stride(1), Hc, nblk,
        D=D, BLOCK=block_size, num_warps=4,
    )
    return outs
