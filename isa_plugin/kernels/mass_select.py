"""The adaptive mode's per-query-block selection (``docs/ADAPTIVE.md`` steps 2-4) and the plan's lists, in Triton.

:func:`mass_select_triton` takes the pooled logits and KV' and returns the plan's exact mask, its CSR lists and
the diagnostics, with the rule of :meth:`AdaptiveMode.exact_count <isa_plugin.selection.adaptive.AdaptiveMode.exact_count>`:

``_mass_select_kernel`` — grid (B*H*nb,), one query-block row per program, the row in registers:
    m = softmax over KV' of (logits + ln n_j); T = the text blocks' mass; the non-text KV' candidates sorted by
    descending m (one bitonic sort of packed keys: the float's order-preserving image in the high 32 bits and
    2^32-1-j in the low ones, so ties go to the lower block id, as the reference's stable sort); k* = the
    number of leading sums T + S_k below the row's threshold p (K' when p >= 1), clamped to
    [min_blocks, max_blocks], K' for text query blocks; the exact blocks are the candidates whose key is at
    least the k*-th largest, plus the text blocks of KV'. Writes the exact row, k*, the covered mass and the
    row length.
``_lists_kernel`` — grid (B*H*nb,): the row's exact block ids, ascending, at its CSR offset (prefix sum of the
    row lengths, one torch ``cumsum``).

Nothing is read on the host: a call can be captured in a CUDA graph. Float rounding of the prefix sums may
differ from torch's (a parallel scan either way), so a row whose sum lands within rounding of p may keep one
block more or less than the torch planner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import _ordered

__all__ = ["mass_select_triton"]


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _mass_select_kernel(
    RAW,  # [B*H*nb, nb] float32 pooled logits (scaled)
    LOG_N,  # [nb] float32 ln(count)
    KV_KEEP,  # [B*H, nb] uint8 (KV')
    IS_X,  # [nb] uint8 text blocks
    P_Q,  # [H, nb] float64 threshold of every query block
    MIN_B, MAX_B,  # [H] int64
    EXACT,  # out [B*H*nb, nb] uint8
    N_EXACT,  # out [B*H*nb] int64
    COVERED,  # out [B*H*nb] float32
    ROW_LEN,  # out [B*H*nb] int64
    H, nb,
    NBP: tl.constexpr,  # nb rounded up to a power of two
):
    r = tl.program_id(0).to(tl.int64)
    bh = r // nb
    i = r % nb
    h = bh % H
    o = tl.arange(0, NBP)
    valid = o < nb
    raw = tl.load(RAW + r * nb + o, mask=valid, other=0.0)
    keep = (tl.load(KV_KEEP + bh * nb + o, mask=valid, other=0) != 0) & valid
    is_x = (tl.load(IS_X + o, mask=valid, other=0) != 0) & valid
    s = tl.where(keep, raw + tl.load(LOG_N + o, mask=valid, other=0.0), float("-inf"))
    e = tl.exp(s - tl.max(s, 0))
    m = e / tl.sum(e, 0)  # pooled mass over KV' (count bias)
    m = tl.where(keep, m, 0.0)
    text = tl.sum(tl.where(is_x, m, 0.0), 0)
    cand = keep & ~is_x
    kprime = tl.sum(cand.to(tl.int32), 0)
    lo_bits = 4294967295 - o.to(tl.int64)
    img = tl.where(cand, _ordered(m), tl.where(valid, _ordered(tl.full([NBP], -1.0, tl.float32)), _ordered(tl.full([NBP], -2.0, tl.float32))))
    key = img * 4294967296 + lo_bits
    skey = tl.sort(key, descending=True)
    hi = (skey >> 32).to(tl.int32)
    ms = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    ms = tl.where(o < kprime, ms, 0.0)  # sorted candidate masses, 0 past the candidates
    # reached_k = T + S_k (S_k: the k largest), made non-decreasing; below = #{k : reached_k < p}
    t_inf = tl.where(text == text, text, float("inf"))
    acc = text + tl.cumsum(ms, 0)  # T + S_{k+1}
    acc = tl.where(acc == acc, acc, float("inf"))  # NaN -> inf (as the reference's nan_to_num)
    incl = tl.maximum(tl.associative_scan(acc, 0, _max_combine), t_inf)  # with T (S_0 = 0) in the running max
    p64 = tl.load(P_Q + h * nb + i)
    p = p64.to(tl.float32)
    cnt = tl.sum(((incl < p) & (o < nb - 1)).to(tl.int32), 0)
    below = tl.where(t_inf < p, 1 + cnt, 0)
    k_star = tl.where(p64 >= 1.0, kprime, tl.minimum(below, kprime))
    lo = tl.minimum(tl.load(MIN_B + h).to(tl.int32), kprime)
    mx = tl.load(MAX_B + h).to(tl.int32)
    hi_b = tl.where(mx > 0, tl.minimum(mx, kprime), kprime)
    n_ex = tl.minimum(tl.maximum(k_star, lo), hi_b)
    n_ex = tl.where(tl.load(IS_X + i) != 0, kprime, n_ex)
    thr = tl.sum(tl.where(o == n_ex - 1, skey, 0), 0)
    exact = (cand & (key >= thr) & (n_ex > 0)) | (is_x & keep)
    tl.store(EXACT + r * nb + o, exact.to(tl.uint8), mask=valid)
    tl.store(N_EXACT + r, n_ex.to(tl.int64))
    tl.store(COVERED + r, tl.sum(tl.where(exact, m, 0.0), 0))
    tl.store(ROW_LEN + r, tl.sum(exact.to(tl.int64), 0))


@triton.jit
def _lists_kernel(EXACT, ROW_PTR, COL, nb, nnz, NBP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    bh = r // nb
    i = r % nb
    o = tl.arange(0, NBP)
    valid = o < nb
    e = tl.load(EXACT + r * nb + o, mask=valid, other=0).to(tl.int32)
    pos = tl.cumsum(e, 0) - e
    start = tl.load(ROW_PTR + bh * (nb + 1) + i)
    tl.store(COL + bh * nnz + start + pos, o.to(tl.int64), mask=valid & (e != 0))


def mass_select_triton(raw: torch.Tensor, log_n: torch.Tensor, kv_keep: torch.Tensor, is_x: torch.Tensor, p_q: torch.Tensor,
                       min_blocks: torch.Tensor, max_blocks: torch.Tensor):
    """Steps 2-4 of the adaptive mode and the plan's lists, on the device (see the module docstring).

    Args:
        raw: [B, H, nb, nb] float32 pooled logits q̄ k̄ᵀ · scale. log_n: [nb] float32 ln(token count).
        kv_keep: [B, H, nb] bool (KV'). is_x: [nb] bool (text blocks).
        p_q: [H, nb] float64 threshold of every query block. min_blocks, max_blocks: [H] int64.

    Returns:
        ``(exact, row_ptr, col_idx, n_exact, covered)``: [B, H, nb, nb] bool; [B, H, nb + 1] int64; [B, H, nb·nb]
        int64 (ascending ids per row, -1 past the lists); [B, H, nb] int64; [B, H, nb] float32.
    """
    B, H, nb, _ = raw.shape
    dev = raw.device
    rows = B * H * nb
    raw = raw.float().contiguous()
    exact = torch.empty(B, H, nb, nb, dtype=torch.bool, device=dev)
    n_exact = torch.empty(B, H, nb, dtype=torch.int64, device=dev)
    covered = torch.empty(B, H, nb, dtype=torch.float32, device=dev)
    row_len = torch.empty(B, H, nb, dtype=torch.int64, device=dev)
    NBP = max(16, triton.next_power_of_2(nb))
    warps = 4 if NBP <= 512 else 8
    if rows:
        _mass_select_kernel[(rows,)](
            raw, log_n.float().contiguous(), kv_keep.contiguous().view(torch.uint8), is_x.contiguous().view(torch.uint8),
            p_q.double().contiguous(), min_blocks.contiguous(), max_blocks.contiguous(),
            exact.view(torch.uint8), n_exact, covered, row_len, H, nb, NBP=NBP, num_warps=warps)
    row_ptr = torch.zeros(B, H, nb + 1, dtype=torch.int64, device=dev)
    torch.cumsum(row_len, dim=-1, out=row_ptr[..., 1:])
    col_idx = torch.full((B, H, nb * nb), -1, dtype=torch.int64, device=dev)
    if rows:
        _lists_kernel[(rows,)](exact.view(torch.uint8), row_ptr, col_idx, nb, nb * nb, NBP=NBP, num_warps=warps)
    return exact, row_ptr, col_idx, n_exact, covered
