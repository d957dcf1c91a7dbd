"""Row-wise selections of ISA planning in Triton: top-k mass (sharpness) and the Taylor selections.

Both sort one row per program in registers (``tl.sort``, bitonic), which replaces several radix-select
passes and the index bookkeeping torch would need.

``_topk_mass_fwd_kernel`` — grid (B*H*nb,): sharp[r] = sum of the K largest of P[r, cols], where cols is
    the contiguous target-column range [c0, c0 + L).
``_taylor_select_fwd_kernel`` — grid (T, B*H), one program per Taylor query block (``qb`` [B*H, T], -1 =
    padding): scores = pooled logits of the row at the (b, h)'s KV' blocks ``kv_list`` (non-text,
    valid positions only); the ``n_exact[h]`` highest (ties: lower block id, as the reference's stable
    sort) are computed exactly. Writes ``tsel`` (text ids first, then the selected ids), ``tsel_len``
    and the ``approx`` row (1 = pseudo-key) for that query block.

Sort keys pack the float's order-preserving integer image in the high 32 bits and (2^32-1 - block id)
in the low 32 bits, so keys are unique and a descending sort puts ties on the lower block id first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["topk_mass_triton", "taylor_select_triton"]


@triton.jit
def _topk_mass_fwd_kernel(
    P, OUT, sp_r, c0, L, K,
    LP: tl.constexpr,  # next power of two >= L: the sorted row length
):
    i_r = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, LP)
    b_p = tl.load(P + i_r * sp_r + c0 + o_c, mask=o_c < L, other=float("-inf"))  # [LP]
    b_s = tl.sort(b_p, descending=True)  # [LP]
    tl.store(OUT + i_r, tl.sum(tl.where(o_c < K, b_s, 0.0), axis=0))


def topk_mass_triton(P: torch.Tensor, c0: int, L: int, K: int) -> torch.Tensor:
    """Sum of the K largest entries of P[..., c0:c0+L] for P [..., nb] float32 (last dim contiguous)."""
    rows = P.numel() // P.shape[-1]
    P2 = P.reshape(rows, P.shape[-1])
    out = torch.empty(rows, device=P.device, dtype=torch.float32)
    LP = max(16, triton.next_power_of_2(L))
    _topk_mass_fwd_kernel[(rows,)](P2, out, P2.stride(0), c0, L, K, LP=LP, num_warps=4)
    return out.reshape(P.shape[:-1])


@triton.jit
def _ordered(x):
    """Order-preserving int64 image of a float32 (monotone for all non-NaN values)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _taylor_select_fwd_kernel(
    LOGITS,  # [B*H, nb, nb] float32 pooled logits
    QB,  # [B*H, T] int64 Taylor query blocks (-1 = padding)
    KV_LIST, KV_LEN,  # [B*H, Kmax] int32, [B*H] int32
    KINDS,  # [nb] int64 (2 = text)
    X_IDS,  # [n_text] int64 text block ids
    N_EXACT,  # [H] int64 exact count per head
    TSEL, TSEL_LEN, APPROX,  # [B*H, nb, S] int32, [B*H, nb] int32, [B*H, nb, Kmax] int8
    H, T, nb, Kmax, S, n_text,
    KP: tl.constexpr,  # next power of two >= Kmax: the sorted row length
    XP: tl.constexpr,  # next power of two >= max(n_text, 1)
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_qb = tl.load(QB + i_bh * T + i_t)
    if i_qb >= 0:
        kv_len = tl.load(KV_LEN + i_bh)
        n_ex = tl.load(N_EXACT + i_bh % H)
        o_p = tl.arange(0, KP)
        m_p = o_p < kv_len
        b_blk = tl.load(KV_LIST + i_bh * Kmax + o_p, mask=m_p, other=0).to(tl.int64)  # [KP]
        b_kind = tl.load(KINDS + b_blk, mask=m_p, other=2)
        m_c = m_p & (b_kind != 2)  # candidates: valid, non-text
        b_lg = tl.load(LOGITS + (i_bh * nb + i_qb) * nb + b_blk, mask=m_c, other=0.0)  # [KP]
        key = _ordered(b_lg) * 4294967296 + (4294967295 - b_blk)
        key = tl.where(m_c, key, -9223372036854775807 - 1)  # [KP]
        b_sorted = tl.sort(key, descending=True)
        thr = tl.sum(tl.where(o_p == n_ex - 1, b_sorted, 0), axis=0)
        m_sel = m_c & (key >= thr)
        row = i_bh * nb + i_qb
        tl.store(APPROX + row * Kmax + o_p, (m_c & ~m_sel).to(tl.int8), mask=o_p < Kmax)
        o_x = tl.arange(0, XP)
        b_x = tl.load(X_IDS + o_x, mask=o_x < n_text, other=0)
        tl.store(TSEL + row * S + o_x, b_x.to(tl.int32), mask=o_x < n_text)
        b_id = 4294967295 - (b_sorted & 4294967295)  # block ids, best first
        tl.store(TSEL + row * S + n_text + o_p, b_id.to(tl.int32), mask=o_p < n_ex)
        tl.store(TSEL_LEN + row, (n_text + n_ex).to(tl.int32))


def taylor_select_triton(logits, qb, kv_list, kv_len, kinds, x_ids, n_exact, s_max):
    """Taylor selections of the query blocks ``qb`` [B, H, T] (see the module docstring).

    Returns (tsel [B, H, nb, S] int32, tsel_len [B, H, nb] int32, approx [B, H, nb, Kmax] int8); rows of
    other query blocks are zero (empty lists).
    """
    B, H, nb, _ = logits.shape
    T = qb.shape[-1]
    kmax = kv_list.shape[-1]
    n_text = int(x_ids.numel())
    S = max(1, n_text + s_max)
    dev = logits.device
    tsel = torch.zeros(B, H, nb, S, device=dev, dtype=torch.int32)
    tsel_len = torch.zeros(B, H, nb, device=dev, dtype=torch.int32)
    approx = torch.zeros(B, H, nb, kmax, device=dev, dtype=torch.int8)
    if T == 0:
        return tsel, tsel_len, approx
    KP = max(16, triton.next_power_of_2(kmax))
    XP = max(16, triton.next_power_of_2(max(1, n_text)))
    _taylor_select_fwd_kernel[(T, B * H)](
        logits.contiguous(), qb.reshape(B * H, T).contiguous(), kv_list.reshape(B * H, kmax).contiguous(),
        kv_len.reshape(B * H).contiguous(), kinds, x_ids if n_text else kinds, n_exact,
        tsel, tsel_len, approx, H, T, nb, kmax, S, n_text,
        KP=KP, XP=XP, num_warps=4 if KP <= 1024 else 8,
    )
    return tsel, tsel_len, approx
