"""Triton kernel of the coarse residual's last step: ``out[t] += gate[t] · row[t // block_size]`` in place.

Layout:
    out: [B, N, H, D] (any strides with a unit stride on D), fp16 / bf16 / fp32; updated in place.
    rows: [B, H, nb, D] float32 contiguous, the coarse rows of the whole-sequence blocks
        (``nb = ceil(N / block_size)``); token t reads row ``t // block_size``.
    gate: [B, N] float32 contiguous, one scalar per token.

Grid: (ceil(N / BT), B * H). One program loads a [BT, D] tile of one (batch, head) of ``out`` (rows
H*D elements apart), the BT gates and the BT block rows (a few distinct rows, cached), and stores
``out + gate · row`` computed in float32. Traffic: one read and one write of ``out`` (the rows and the
gate are small), i.e. 2 * B * N * H * D * itemsize bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["coarse_residual_add_triton"]

#: tokens per program
_BT = 64


@triton.jit
def _coarse_add_kernel(
    OUT,  # [B, N, H, D], unit stride on D; updated in place
    ROWS,  # [B, H, nb, D] float32 contiguous
    GATE,  # [B, N] float32 contiguous
    so_b, so_n, so_h,
    N, H, nb, block_size,
    D: tl.constexpr,  # head dim: tile width, a power of two
    BT: tl.constexpr,  # tokens per program
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < N
    o_d = tl.arange(0, D)
    off = i_b.to(tl.int64) * so_b + i_h.to(tl.int64) * so_h + o_t.to(tl.int64)[:, None] * so_n + o_d[None, :]
    b_o = tl.load(OUT + off, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BT, D]
    b_g = tl.load(GATE + i_b.to(tl.int64) * N + o_t, mask=m_t, other=0.0)  # [BT]
    o_r = (i_bh.to(tl.int64) * nb + (o_t // block_size).to(tl.int64))[:, None] * D + o_d[None, :]
    b_r = tl.load(ROWS + o_r, mask=m_t[:, None], other=0.0)  # [BT, D]
    tl.store(OUT + off, (b_o + b_g[:, None] * b_r).to(OUT.dtype.element_ty), mask=m_t[:, None])


def coarse_residual_add_triton(out: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, block_size: int) -> None:
    """Add ``gate · rows[block of t]`` to every token of ``out``, in place.

    Args:
        out: [B, N, H, D] with a unit stride on D (D a power of two, 16 to 256); fp16, bf16 or fp32.
        rows: [B, H, nb, D] float32 contiguous, ``nb = ceil(N / block_size)``.
        gate: [B, N] float32 contiguous.
        block_size: tokens per whole-sequence block (> 0).

    Returns:
        None (``out`` is updated).

    Raises:
        ValueError: shapes, dtypes or strides outside the above.

    Example:
        >>> coarse_residual_add_triton(out, rows, gate, 64)  # doctest: +SKIP
    """
    if out.ndim != 4 or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, N, H, D] with a unit stride on D, got shape {tuple(out.shape)}, strides {out.stride()}")
    B, N, H, D = out.shape
    if D & (D - 1) or not 16 <= D <= 256:
        raise ValueError(f"head_dim={D} must be a power of two from 16 to 256")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    nb = -(-N // block_size)
    if rows.shape != (B, H, nb, D) or rows.dtype != torch.float32 or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous float32 [B, H, nb, D] = {(B, H, nb, D)}, got {tuple(rows.shape)} {rows.dtype}")
    if gate.shape != (B, N) or gate.dtype != torch.float32 or not gate.is_contiguous():
        raise ValueError(f"gate must be contiguous float32 [B, N] = {(B, N)}, got {tuple(gate.shape)} {gate.dtype}")
    if N == 0 or B * H == 0:
        return
    _coarse_add_kernel[(triton.cdiv(N, _BT), B * H)](
        out, rows, gate, out.stride(0), out.stride(1), out.stride(2), N, H, nb, block_size,
        D=D, BT=_BT, num_warps=4,
    )
