"""Pseudo-key slots of every key block in one Triton kernel: contiguous sub-block means, or k-means centroids.

:mod:`.pseudo` defines both kinds; this kernel computes them for the block-sparse executor. One program per
(batch entry, head, block) loads the block's [BLOCK, D] keys once, starts from C slots of ``S`` tokens
(``ITERS = 0``: the sub-block means) and runs ``ITERS`` Lloyd iterations: the distances |c|² − 2·k·c and the
centroid sums (one-hot assignment × keys) are two dots with C padded to 16 rows. The distances are float32
dots (three-pass TF32 on tensor cores, IEEE for float32 inputs) and the sums take the keys in the input dtype
with float32 accumulation, so they match the float32 torch definition up to float32 rounding (a token almost
equidistant from two centroids may still go the other way). Outputs:

- ``kc``, ``vc``: [B*H, nb*C, D] in the input dtype, block j's slots at [j·C, (j+1)·C) (an empty slot keeps its
  last centroid; its value is 0);
- ``log2c``: [B*H, nb*C] float32, log2 of the slot's token count, −inf for an empty slot;
- ``poison``: [B*H, D] float32, 0, or NaN in every column of a head with a non-finite key and in the columns
  of its non-finite values (dense attention's behaviour, which the executor adds to its output).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["pseudo_slots_triton"]


@triton.jit
def _slot_sums(b_oh, b_x, IEEE: tl.constexpr):
    """[CP, D] float32 sums of the rows of b_x [BLOCK, D] per slot, for the one-hot assignment b_oh [BLOCK, CP]."""
    if IEEE:
        return tl.dot(tl.trans(b_oh), b_x, input_precision="ieee")
    return tl.dot(tl.trans(b_oh.to(b_x.dtype)), b_x)


@triton.jit(do_not_specialize=["H", "nb"])
def _pseudo_slots_kernel(
    K, V, KC, VC, LOG2C, POISON_K, POISON_V,
    STARTS, COUNTS,
    sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    H, nb,
    D: tl.constexpr, BLOCK: tl.constexpr, S: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
    ITERS: tl.constexpr, IEEE: tl.constexpr,
):
    i_item = tl.program_id(0)  # (b*H + h)*nb + j
    i_bh = i_item // nb
    i_j = i_item % nb
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    start = tl.load(STARTS + i_j).to(tl.int64)
    cnt = tl.load(COUNTS + i_j)
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, CP)
    m_r = o_r < cnt
    b_k = tl.load(K + i_b * sk_b + i_h * sk_h + (start + o_r)[:, None] * sk_n + o_d[None, :], mask=m_r[:, None], other=0.0)
    b_kf = b_k.to(tl.float32)
    # the starting slots: tokens [c*S, (c+1)*S) of the block
    b_oh = ((o_r[:, None] // S == o_c[None, :]) & m_r[:, None]).to(tl.float32)  # [BLOCK, CP]
    b_n = tl.sum(b_oh, 0)  # [CP]
    b_cent = _slot_sums(b_oh, b_kf if IEEE else b_k, IEEE) / tl.maximum(b_n, 1.0)[:, None]  # [CP, D]
    for _ in tl.static_range(ITERS):
        b_cc = tl.sum(b_cent * b_cent, 1)  # [CP]
        # the distances in float32 (three-pass TF32 on tensor cores), as the torch definition computes them
        if IEEE:
            b_dot = tl.dot(b_kf, tl.trans(b_cent), input_precision="ieee")  # [BLOCK, CP]
        else:
            b_dot = tl.dot(b_kf, tl.trans(b_cent), input_precision="tf32x3")
        b_dist = tl.where((b_n > 0)[None, :], b_cc[None, :] - 2.0 * b_dot, float("inf"))
        b_best = tl.argmin(b_dist, 1, tie_break_left=True)  # [BLOCK]
        b_oh = ((b_best[:, None] == o_c[None, :]) & m_r[:, None]).to(tl.float32)
        b_n_new = tl.sum(b_oh, 0)
        b_new = _slot_sums(b_oh, b_kf if IEEE else b_k, IEEE) / tl.maximum(b_n_new, 1.0)[:, None]
        b_cent = tl.where((b_n_new > 0)[:, None], b_new, b_cent)
        b_n = b_n_new
    b_v = tl.load(V + i_b * sv_b + i_h * sv_h + (start + o_r)[:, None] * sv_n + o_d[None, :], mask=m_r[:, None], other=0.0)
    b_vals = _slot_sums(b_oh, b_v.to(tl.float32) if IEEE else b_v, IEEE) / tl.maximum(b_n, 1.0)[:, None]
    i_bh64 = i_bh.to(tl.int64)
    m_c = o_c < C
    p_out = (i_bh64 * nb + i_j) * C + o_c  # [CP] slot rows
    tl.store(KC + p_out[:, None] * D + o_d[None, :], b_cent.to(KC.dtype.element_ty), mask=m_c[:, None])
    tl.store(VC + p_out[:, None] * D + o_d[None, :], b_vals.to(VC.dtype.element_ty), mask=m_c[:, None])
    tl.store(LOG2C + p_out, tl.where(b_n > 0, tl.log2(tl.maximum(b_n, 1.0)), float("-inf")), mask=m_c)
    # 0 * x is NaN exactly where x is not finite
    tl.store(POISON_K + i_bh64 * nb + i_j, tl.sum(tl.sum(b_kf * 0.0, 1), 0))
    tl.store(POISON_V + (i_bh64 * nb + i_j) * D + o_d, tl.sum(b_v.to(tl.float32) * 0.0, 0))


def pseudo_slots_triton(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, block_size: int,
                        pseudo_block: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C = block_size / pseudo_block slots of every block of k, v [B, N, H, D] (unit stride on D).

    Args:
        starts, counts: [nb] int32 block starts and true token counts (every count <= block_size).
        iters: Lloyd iterations: 0 for ``"mean"`` pseudo-keys, :data:`~isa_plugin.kernels.pseudo.KMEANS_ITERS`
            for ``"kmeans"``.

    Returns:
        ``(kc, vc, log2c, poison)`` as in the module docstring.
    """
    B, N, H, D = k.shape
    nb = int(starts.shape[0])
    C = block_size // pseudo_block
    kc = torch.empty(B * H, nb * C, D, device=k.device, dtype=k.dtype)
    vc = torch.empty_like(kc)
    log2c = torch.empty(B * H, nb * C, device=k.device, dtype=torch.float32)
    pk = torch.empty(B * H, nb, device=k.device, dtype=torch.float32)
    pv = torch.empty(B * H, nb, D, device=k.device, dtype=torch.float32)
    if B * H * nb:
        _pseudo_slots_kernel[(B * H * nb,)](
            k, v, kc, vc, log2c, pk, pv, starts, counts,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), H, nb,
            D=D, BLOCK=max(16, triton.next_power_of_2(block_size)), S=int(pseudo_block), C=C, CP=max(16, triton.next_power_of_2(C)),
            ITERS=int(iters), IEEE=k.dtype == torch.float32, num_warps=4 if block_size * D <= 8192 else 8,
        )
    poison = pk.sum(-1)[:, None] + pv.sum(1)  # [B*H, D]
    return kc, vc, log2c, poison
