"""ISA attention over index lists: exact KV blocks plus block-mean pseudo-keys, one online softmax.

Layout:
    q, k, v, out: [B, N, H, D] (diffusers' layout, read and written through strides; D contiguous),
        fp16 / bf16 (fp32 supported with IEEE dots, for tests and fp32 callers).
    kbar, vbar: [B*H, nb, D] block means in the input dtype; log2n: [nb] float32, log2 of true counts.
    Work items (one program each): ``w_bh`` (b*H + h), ``w_qb`` (query block), ``w_loff`` / ``w_llen``
        (slice of ``lists`` holding the exactly computed KV blocks); ``w_qb = -1`` marks a padding item
        that writes nothing.
    Taylor items also walk the (b, h)'s KV' list ``kv_list`` [B*H, Kmax] and take as pseudo-key every
        position whose ``approx`` [B*H, nb, Kmax] flag is set, with logit bias ln(n_j).
    Exact items may start from a partial softmax state (``init_o`` rows and their natural-log
        ``init_lse``), e.g. cuDNN attention over a common prefix of KV': the kernel then merges the
        remaining blocks in and scatters the rows back to their token positions.

Grid: (number of work items,). Items are ordered heavy first by the host, so uneven per-head work
(per-head ratios) does not leave a tail. Softmax state (m, l, acc) is float32 in the log2 domain.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["isa_attn_items"]

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    if _interpreting():
        # one config (the interpreter cannot time configs); KB=2 exercises the general tile path
        return [triton.Config({"BP": 64, "KB": 2}, num_warps=4, num_stages=1)]
    # KB=2 (two KV blocks per key tile) is supported but left out: with it in the list the Taylor group
    # measured 7.10 ms instead of 6.5 ms (H200, N=65,536, H=40), and it doubles the autotuning time
    return [
        triton.Config({"BP": 64, "KB": 1}, num_warps=w, num_stages=st)
        for w in (4, 8)
        for st in (2, 3)
    ]


def _prune(configs, named_args, **kwargs):
    # two blocks per key tile only for blocks of 64 rows or fewer (tiles of at most 128 keys)
    out = [c for c in configs if c.kwargs["KB"] == 1 or kwargs.get("BLOCK", named_args.get("BLOCK", 64)) <= 64]
    return out or configs[:1]


@triton.autotune(configs=_configs(), key=["D", "BLOCK", "TAYLOR", "INIT", "IEEE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _isa_attn_fwd_kernel(
    Q, K, V, O,
    KBAR, VBAR, LOG2N,
    STARTS, COUNTS,
    W_BH, W_QB, W_LOFF, W_LLEN, W_IOFF, W_IROW,
    LISTS,
    KV_LIST, KV_LEN, APPROX,
    INIT_O, INIT_LSE,
    sq_b, sq_n, sq_h,
    sk_b, sk_n, sk_h,
    sv_b, sv_n, sv_h,
    so_b, so_n, so_h,
    si_r,
    H, nb, Kmax, tay_s, scale_log2,
    D: tl.constexpr,  # head dim: tile width of every load and dot
    BLOCK: tl.constexpr,  # padded ISA block size: query tile height and key tile height
    BP: tl.constexpr,  # pseudo-keys per tile in the Taylor loop
    KB: tl.constexpr,  # KV blocks per key tile (1 or 2): wider dots, half the softmax rescales
    TAYLOR: tl.constexpr,  # walk the pseudo-key list (Taylor items) or not (exact items)
    INIT: tl.constexpr,  # start from a given (o, lse) state instead of an empty softmax
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots instead of tf32
):
    tl.static_assert(BLOCK >= 16)
    tl.static_assert(BP >= 16)
    i_w = tl.program_id(0)
    i_bh = tl.load(W_BH + i_w)
    i_qb = tl.load(W_QB + i_w)
    # padding items (query block -1) write nothing: zero rows, empty lists
    valid = i_qb >= 0
    i_qb = tl.maximum(i_qb, 0)
    if TAYLOR:
        # Taylor items: the row (b, h, qb) of tsel [B*H, nb, tay_s]; W_LLEN holds tsel_len [B*H, nb]
        l_off = (i_bh.to(tl.int64) * nb + i_qb) * tay_s
        l_len = tl.where(valid, tl.load(W_LLEN + i_bh.to(tl.int64) * nb + i_qb), 0)
    else:
        l_off = tl.load(W_LOFF + i_w).to(tl.int64)
        l_len = tl.where(valid, tl.load(W_LLEN + i_w), 0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)

    q_start = tl.load(STARTS + i_qb).to(tl.int64)
    q_cnt = tl.where(valid, tl.load(COUNTS + i_qb), 0)
    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < q_cnt

    p_q = Q + i_b * sq_b + i_h * sq_h + (q_start + o_m)[:, None] * sq_n + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)  # [BLOCK, D]

    if INIT:
        i_off = tl.load(W_IOFF + i_w)
        i_row = tl.load(W_IROW + i_w)
        b_acc = tl.load(INIT_O + i_off + o_m[:, None].to(tl.int64) * si_r + o_d[None, :], mask=m_m[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        b_m = tl.load(INIT_LSE + i_row + o_m, mask=m_m, other=0.0) * 1.4426950408889634  # [BLOCK]
        b_l = tl.full([BLOCK], 1.0, dtype=tl.float32)
    else:
        b_acc = tl.zeros([BLOCK, D], dtype=tl.float32)
        b_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK], dtype=tl.float32)

    p_k0 = K + i_b * sk_b + i_h * sk_h + o_d[None, :]
    p_v0 = V + i_b * sv_b + i_h * sv_h + o_d[None, :]
    o_t = tl.arange(0, KB * BLOCK)
    o_sub = o_t // BLOCK  # which of the tile's KB blocks a key row belongs to
    o_r = o_t % BLOCK
    for j in range(0, l_len, KB):
        m_blk = (j + o_sub) < l_len
        i_kb = tl.load(LISTS + l_off + j + o_sub, mask=m_blk, other=0)  # [KB*BLOCK]
        k_start = tl.load(STARTS + i_kb).to(tl.int64)
        k_cnt = tl.load(COUNTS + i_kb)
        m_n = m_blk & (o_r < k_cnt)
        b_k = tl.load(p_k0 + (k_start + o_r)[:, None] * sk_n, mask=m_n[:, None], other=0.0)  # [KB*BLOCK, D]
        b_v = tl.load(p_v0 + (k_start + o_r)[:, None] * sv_n, mask=m_n[:, None], other=0.0)  # [KB*BLOCK, D]
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BLOCK, KB*BLOCK]
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))  # [BLOCK, KB*BLOCK]
        b_s = tl.where(m_n[None, :], b_s * scale_log2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.math.exp2(b_s - b_mn[:, None])  # [BLOCK, KB*BLOCK]
        b_alpha = tl.math.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
        else:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn

    if TAYLOR:
        kv_len = tl.where(valid, tl.load(KV_LEN + i_bh), 0)
        o_p = tl.arange(0, BP)
        p_list = KV_LIST + i_bh.to(tl.int64) * Kmax
        p_appr = APPROX + (i_bh.to(tl.int64) * nb + i_qb) * Kmax
        p_bar = i_bh.to(tl.int64) * nb * D
        for p0 in range(0, kv_len, BP):
            m_p = (p0 + o_p) < kv_len
            i_pb = tl.load(p_list + p0 + o_p, mask=m_p, other=0)  # [BP]
            m_a = tl.load(p_appr + p0 + o_p, mask=m_p, other=0) != 0  # [BP]
            b_kb = tl.load(KBAR + p_bar + i_pb[:, None].to(tl.int64) * D + o_d[None, :], mask=m_a[:, None], other=0.0)  # [BP, D]
            b_vb = tl.load(VBAR + p_bar + i_pb[:, None].to(tl.int64) * D + o_d[None, :], mask=m_a[:, None], other=0.0)  # [BP, D]
            b_lg = tl.load(LOG2N + i_pb, mask=m_a, other=0.0)  # [BP]
            if IEEE:
                b_s = tl.dot(b_q, tl.trans(b_kb), input_precision="ieee")  # [BLOCK, BP]
            else:
                b_s = tl.dot(b_q, tl.trans(b_kb))  # [BLOCK, BP]
            b_s = tl.where(m_a[None, :], b_s * scale_log2 + b_lg[None, :], float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_p = tl.math.exp2(b_s - b_mn[:, None])  # [BLOCK, BP]
            b_alpha = tl.math.exp2(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            if IEEE:
                b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_vb.dtype), b_vb, input_precision="ieee")
            else:
                b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_vb.dtype), b_vb)
            b_m = b_mn

    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # padding items have empty rows
    p_o = O + i_b * so_b + i_h * so_h + (q_start + o_m)[:, None] * so_n + o_d[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None])


def isa_attn_items(
    q, k, v, out, kbar, vbar, log2n, starts, counts,
    w_bh, w_qb, w_loff, w_llen, lists,
    *, block_size: int, scale: float,
    taylor: bool = False, kv_list=None, kv_len=None, approx=None,
    init_o=None, init_lse=None, w_ioff=None, w_irow=None, init_row_stride: int = 0, tay_s: int = 0,
):
    """Launch :func:`_isa_attn_fwd_kernel` over a list of work items (see the module docstring).

    Args:
        q, k, v, out: [B, N, H, D] with a unit stride on D; ``out`` is written at the items' query rows.
        kbar, vbar: [B*H, nb, D] contiguous block means in q's dtype. log2n: [nb] float32.
        starts, counts: [nb] int32 block starts and true counts.
        w_bh, w_qb, w_loff, w_llen: [W] int32/int64 work items; ``lists`` int32 pool of KV block ids.
        taylor: walk ``kv_list`` [B*H, Kmax] (valid ``kv_len`` [B*H]) and take the pseudo-keys flagged in
            ``approx`` [B*H, nb, Kmax] int8. Taylor items take their exact list from row (b, h, qb) of
            ``lists`` = tsel [B*H, nb, tay_s], of length ``w_llen`` = tsel_len [B*H, nb] at that row
            (``w_loff`` is unused).
        init_o / init_lse / w_ioff / w_irow / init_row_stride: optional starting state per item: rows
            ``init_o[w_ioff + r * init_row_stride]`` and ``init_lse[w_irow + r]`` (natural log).

    Raises:
        ValueError: a head dim that is not a power of two in [16, 256] or a non-unit stride on D.
    """
    B, N, H, D = q.shape
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim={D} is not supported; supported: 16, 32, 64, 128, 256")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on the head dimension")
    W = int(w_bh.numel())
    if W == 0:
        return out
    BLOCK = max(16, triton.next_power_of_2(int(block_size)))
    nb = int(starts.numel())
    dummy = w_bh
    if taylor:
        Kmax = int(kv_list.shape[-1])
    else:
        kv_list = kv_len = approx = dummy
        Kmax = 1
    init = init_o is not None
    if not init:
        init_o = init_lse = q
        w_ioff = w_irow = dummy
    _isa_attn_fwd_kernel[(W,)](
        q, k, v, out, kbar, vbar, log2n, starts, counts,
        w_bh, w_qb, w_loff, w_llen, w_ioff, w_irow, lists,
        kv_list, kv_len, approx, init_o, init_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        init_row_stride,
        H, nb, Kmax, tay_s, float(scale) * _LOG2E,
        D=D, BLOCK=BLOCK, TAYLOR=bool(taylor), INIT=init, IEEE=(q.dtype == torch.float32),
    )
    return out
