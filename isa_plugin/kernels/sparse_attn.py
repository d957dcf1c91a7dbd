"""Block-sparse attention executor for a :class:`~isa_plugin.plan.BlockPlan`: exact key blocks from CSR
lists plus the pseudo-keys of every remaining KV' block, in one online softmax (forward only).

Semantics (:func:`~isa_plugin.kernels.reference.execute_plan_reference` is the specification), per batch
entry b, head h and query block i of the plan's per-span blocking:

    o_t = [Σ_{j exact} Σ_{r in j} e^{s_tr} v_r + Σ_{j in KV', not exact} n_j e^{q_t·k̄_j·scale} v̄_j]
          / [Σ_{j exact} Σ_{r in j} e^{s_tr}   + Σ_{j in KV', not exact} n_j e^{q_t·k̄_j·scale}]

with s_tr = q_t·k_r·scale, k̄_j / v̄_j the block means (true counts n_j, short last blocks of a span
included) and the exact list of row i being ``col_idx[b, h, row_ptr[b, h, i] : row_ptr[b, h, i + 1]]``.
A plan with ``pseudo_block < block_size`` has C = block_size / pseudo_block pseudo-key slots per block
instead of one mean (sub-block means, or k-means centroids for ``pseudo_keys="kmeans"``: :mod:`.pseudo`),
each with its own count bias; :mod:`.pseudo_triton` computes them before the attention kernel.
A non-finite value anywhere in k (v) of a (b, h) makes that head's output (those feature columns) NaN,
as dense attention would; a (b, h) with no kept key block gives NaN rows (softmax over nothing).

Layout:
    q, k, v, out: [B, N, H, D] (diffusers' layout; read and written through strides, D contiguous),
        fp16 / bf16, or fp32 (IEEE dots without tensor cores: for tests and fp32 callers, slow).
    kbar, vbar: [B*H, nb·C, D] pseudo-keys in the input dtype (C = 1: block means,
        :mod:`~isa_plugin.kernels.pooling`); log2n: log2 of their token counts (the bias ln n in base 2), [nb]
        float32 shared by the heads (C = 1) or [B*H, nb·C] (−inf: an empty slot), row stride ``s_lg``;
        poison: [B*H, D] float32, 0 or NaN (non-finite k / v of the head).
    starts, counts: [nb] int32 block starts and true token counts.
    row_ptr: [B*H, nb + 1], col_idx: [B*H, nnz] (int64 or int32, the plan's CSR lists, ascending).
    kv_list: [B*H, nb] int32, the kept blocks of every (b, h) in ascending order (first kv_len [B*H]).
    bits: [B*H*nb, ceil(nb / 32)] int32, every row's exact blocks as a bit set (``_exact_bits_kernel``).
    order: [B*H*nb] int32 work items (b*H + h)*nb + i, by exact-list length descending.

Grid: (B*H*nb,). Program w runs item ``order[w]`` with its [BLOCK, D] query tile (BLOCK = the block size
rounded up to a power of two) and one (m, l, acc) softmax state in float32, log2 domain:

1. the tail: the C slots of each block of the (b, h)'s KV' list in tiles of BP pseudo-keys (gathered k̄ / v̄
   rows, bias log2 of the slot's count),
   the row's exact blocks masked out by one gathered bit-set word per candidate; rows whose list is all
   of KV' skip it;
2. the exact list in tiles of KB key blocks (KB * BLOCK keys): gathered K / V rows, cp.async-pipelined.
   The next tile's block start and count are loaded one iteration ahead, so the tile addresses of an
   iteration depend on no load of that iteration and num_stages - 1 tiles stay in flight.

Items are issued longest list first (a stable sort on the device keeps (b, h)-major order among equal
lengths, so co-resident programs share K / V in L2), which lets the hardware scheduler balance uneven
rows without a persistent loop. Nothing in the launch path reads a device value on the host, so a call
can be captured in a CUDA graph (after a first call has autotuned the kernel for the shape).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..plan import BlockPlan
from .pooling import pool_blocks_triton
from .pseudo_triton import pseudo_slots_triton

__all__ = ["execute_block_plan", "block_meta", "sparse_ineligible", "sparse_ineligible_for", "sparse_attn_op", "sparse_attn_fwd", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)  # 64 and 128 are the tuned ones; 16 / 32 serve fine pseudo-keys
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- configs
# (KB, BP, num_warps, num_stages) per kind of call; the autotuner times the group of the call's kind
_CONFIG_GROUPS = {
    # 128-row blocks: one block per key tile (128 keys), two warpgroups (wgmma m64 each) per program,
    # 64 or 128 pseudo-keys per tail tile (half or as many tail tiles as exact tiles). num_stages 3 keeps two K / V tiles in flight (224 KiB of
    # shared memory on sm_90; the autotuner drops it where it does not fit)
    "b128": [(1, 64, 8, 2), (1, 64, 8, 3), (1, 128, 8, 2), (1, 128, 8, 3), (1, 64, 8, 2, True), (1, 64, 8, 3, True)],
    # 64-row blocks: key tiles of one or two blocks (64 or 128 keys: two halve the softmax rescales and
    # give wgmma an N of 128). One warpgroup with 128 pseudo-keys per tail tile compiles to about a quarter
    # of the instructions per pseudo-key of two warpgroups with 64 (sm_90 SASS, triton 3.6)
    "b64": [(1, 64, 4, 2), (1, 128, 4, 2), (1, 128, 4, 3), (2, 128, 4, 2), (2, 128, 4, 3), (2, 64, 8, 2), (2, 64, 8, 3),
            (1, 128, 4, 2, True), (1, 128, 4, 3, True)],
    # 16 / 32-row blocks (plans with fine pseudo-keys)
    "small": [(2, 64, 4, 2)],
    # float32 (IEEE dots, no tensor cores): no pipelining, the tiles alone fill the shared memory
    "ieee4": [(1, 32, 4, 1)],
    "ieee8": [(1, 32, 8, 1)],
}


def _group(block: int, ieee: bool, d: int) -> str:
    if ieee:
        return "ieee8" if block * d >= 8192 else "ieee4"
    return "b128" if block >= 128 else "b64" if block == 64 else "small"


def _entry(e) -> tuple:
    """(KB, BP, num_warps, num_stages, TMA) of a config group entry (TMA off unless listed)."""
    return tuple(e) if len(e) == 5 else (*e, False)


def _configs():
    if _interpreting():
        # one config: the interpreter cannot time configs (tests pick others through ``config=``)
        return [triton.Config({"KB": 1, "BP": 64, "TMA": False}, num_warps=4, num_stages=1)]
    return [triton.Config({"KB": kb, "BP": bp, "TMA": tma}, num_warps=w, num_stages=st)
            for group in _CONFIG_GROUPS.values() for kb, bp, w, st, tma in map(_entry, group)]


def _prune(configs, named_args, **kwargs):
    meta = dict(named_args, **kwargs)
    want = {_entry(e) for e in _CONFIG_GROUPS[_group(meta.get("BLOCK", 64), bool(meta.get("IEEE", False)), meta.get("D", 128))]}
    tma_ok = bool(meta.get("TMA_OK", False))
    keep = [c for c in configs if (c.kwargs["KB"], c.kwargs["BP"], c.num_warps, c.num_stages, c.kwargs["TMA"]) in want
            and (tma_ok or not c.kwargs["TMA"])]
    return keep or [c for c in configs if not c.kwargs["TMA"]][:1]


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _key_block(p_col, STARTS, COUNTS, j, l_len):
    """Token start and count of the key block at position j of the exact list (count 0 past its end)."""
    m = j < l_len
    i_kb = tl.load(p_col + j, mask=m, other=0)
    return tl.load(STARTS + i_kb, mask=m, other=0), tl.load(COUNTS + i_kb, mask=m, other=0)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _exact_bits_kernel(
    ROW_PTR, COL_IDX, BITS,  # [B*H, nb + 1], [B*H, nnz] CSR lists; out [B*H*nb, n_words] int32
    nb, nnz, n_words,
    CH: tl.constexpr,  # list entries per step: static tile height
    WP: tl.constexpr,  # n_words padded to a power of two: static tile width
):
    i_row = tl.program_id(0)
    i_bh = (i_row // nb).to(tl.int64)
    i_qb = i_row % nb
    r0 = tl.load(ROW_PTR + i_bh * (nb + 1) + i_qb)
    r1 = tl.load(ROW_PTR + i_bh * (nb + 1) + i_qb + 1)
    o_w = tl.arange(0, WP)
    o_e = tl.arange(0, CH)
    b_w = tl.zeros([WP], dtype=tl.int32)
    for c0 in range(r0, r1, CH):
        m_e = (c0 + o_e) < r1
        i_col = tl.load(COL_IDX + i_bh * nnz + c0 + o_e, mask=m_e, other=0).to(tl.int32)  # [CH]
        i_w = tl.where(m_e, i_col >> 5, -1)
        b_bit = tl.full([CH], 1, tl.int32) << (i_col & 31)
        b_hit = tl.where(i_w[:, None] == o_w[None, :], b_bit[:, None], 0)  # [CH, WP]
        b_w = b_w | tl.reduce(b_hit, 0, _or)
    tl.store(BITS + i_row.to(tl.int64) * n_words + o_w, b_w, mask=o_w < n_words)


# sizes are not specialised (no recompilation per problem size; strides still are: 16-byte vector loads)
@triton.jit(do_not_specialize=["H", "nb", "nnz", "n_words"])
def _sparse_attn_fwd_kernel(
    Q, K, V, O,
    K_DESC, V_DESC,  # TMA descriptors of k, v as [B, N, H*D] with [1, BLOCK, D] boxes (TMA=True), else k, v again
    KBAR, VBAR, LOG2N, POISON,  # pseudo-keys [B*H, nb*C, D] (C slots per block), log2 counts (row stride s_lg), poison
    STARTS, COUNTS,
    ROW_PTR, COL_IDX,
    KV_LIST, KV_LEN, EXACT_BITS,
    ORDER,
    sq_b, sq_n, sq_h,
    sk_b, sk_n, sk_h,
    sv_b, sv_n, sv_h,
    so_b, so_n, so_h,
    H, nb, nnz, n_words, scale_log2, s_lg,
    D: tl.constexpr,  # head dim: width of every tile and dot, must be static
    BLOCK: tl.constexpr,  # padded block size (power of two >= every count): query tile height, key rows per block
    KB: tl.constexpr,  # key blocks per exact tile, 1 or 2 (tile = KB * BLOCK keys): static dot shape
    BP: tl.constexpr,  # pseudo-keys per tail tile
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots instead of tf32
    TAIL: tl.constexpr = True,  # False: the exact part alone (a benchmark's timing of it; the output lacks the pseudo-keys)
    TMA: tl.constexpr = False,  # exact K / V tiles through the TMA descriptors (KB = 1; Hopper)
    TMA_OK: tl.constexpr = False,  # the call has descriptors (an autotuning key: TMA configs are pruned otherwise)
    C: tl.constexpr = 1,  # pseudo-key slots per block (1: the block mean; more: sub-block means or k-means slots)
):
    tl.static_assert(BLOCK >= 16)
    tl.static_assert(BP >= 16)
    tl.static_assert(KB == 1 or KB == 2)
    tl.static_assert(KB == 1 or not TMA)
    i_w = tl.program_id(0)
    i_item = tl.load(ORDER + i_w)
    i_bh = i_item // nb
    i_qb = i_item % nb
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)

    # the row's exact list: COL_IDX[bh, r0 : r0 + l_len]
    p_rp = ROW_PTR + i_bh64 * (nb + 1) + i_qb
    r0 = tl.load(p_rp)
    l_len = (tl.load(p_rp + 1) - r0).to(tl.int32)
    p_col = COL_IDX + i_bh64 * nnz + r0

    q_start = tl.load(STARTS + i_qb).to(tl.int64)
    q_cnt = tl.load(COUNTS + i_qb)
    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < q_cnt
    p_q = Q + i_b * sq_b + i_h * sq_h + (q_start + o_m)[:, None] * sq_n + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)  # [BLOCK, D]

    b_acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    b_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK], dtype=tl.float32)

    # ---- pseudo-keys: the C slots of every KV' block not in the exact list, bias log2(slot count). (This loop
    # runs before the exact one: in the other order ptxas serialises the exact loop's wgmma (C7515) on sm_90.)
    kv_len = tl.load(KV_LEN + i_bh)
    n_tail = tl.where(kv_len > l_len, kv_len * C, 0)  # slots; full rows (list == KV') skip the tail
    if not TAIL:
        n_tail = 0
    o_p = tl.arange(0, BP)
    p_kvl = KV_LIST + i_bh64 * nb
    p_bar = i_bh64 * nb * C * D + o_d[None, :]
    p_lg = LOG2N + i_bh64 * s_lg
    p_bits = EXACT_BITS + (i_bh64 * nb + i_qb) * n_words  # the row's exact blocks as a bit set
    # candidates one tile ahead (loop-carried), so the k̄ / v̄ loads depend on no load of their iteration;
    # every candidate is loaded, the exact ones are masked out of the scores only
    i_cand_nx = tl.load(p_kvl + o_p // C, mask=o_p < n_tail, other=-1)  # [BP]
    for p0 in range(0, n_tail, BP):
        i_cand = i_cand_nx  # [BP] the slots' KV' blocks (ascending), -1 past the end
        i_cand_nx = tl.load(p_kvl + (p0 + BP + o_p) // C, mask=(p0 + BP + o_p) < n_tail, other=-1)
        m_p = i_cand >= 0
        o_blk = tl.where(m_p, i_cand, 0)
        o_bar = o_blk * C + (p0 + o_p) % C  # [BP] slot rows
        b_kb = tl.load(KBAR + p_bar + o_bar.to(tl.int64)[:, None] * D, mask=m_p[:, None], other=0.0)  # [BP, D]
        b_vb = tl.load(VBAR + p_bar + o_bar.to(tl.int64)[:, None] * D, mask=m_p[:, None], other=0.0)  # [BP, D]
        b_lg = tl.load(p_lg + o_bar, mask=m_p, other=0.0)  # [BP] (−inf: an empty slot)
        i_word = tl.load(p_bits + (o_blk >> 5), mask=m_p, other=0)  # [BP]
        m_a = m_p & (((i_word >> (o_blk & 31)) & 1) == 0)  # [BP] pseudo-keys of this tile
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_kb), input_precision="ieee")  # [BLOCK, BP]
        else:
            b_s = tl.dot(b_q, tl.trans(b_kb))  # [BLOCK, BP]
        b_s = b_s * scale_log2 + tl.where(m_a, b_lg, float("-inf"))[None, :]
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # no pseudo-key yet (tiles of exact blocks / empty slots only)
        b_p = tl.math.exp2(b_s - b_ms[:, None])  # [BLOCK, BP]
        b_alpha = tl.math.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_vb.dtype), b_vb, input_precision="ieee")  # [BLOCK, D]
        else:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_vb.dtype), b_vb)  # [BLOCK, D]
        b_m = b_mn

    # ---- exact key blocks, KB (1 or 2) list entries per tile. The next tile's block starts and counts are
    # loaded one iteration ahead (loop-carried scalars), so the K / V addresses of an iteration depend on no
    # load of that iteration and the pipeliner keeps num_stages - 1 tiles in flight, as for dense attention.
    p_k0 = K + i_b * sk_b + i_h * sk_h + o_d[None, :]
    p_v0 = V + i_b * sv_b + i_h * sv_h + o_d[None, :]
    o_t = tl.arange(0, KB * BLOCK)
    o_r = o_t % BLOCK  # row of a key inside its block
    s0_nx, c0_nx = _key_block(p_col, STARTS, COUNTS, 0, l_len)
    s1_nx = s0_nx * 0
    c1_nx = c0_nx * 0
    if KB == 2:
        s1_nx, c1_nx = _key_block(p_col, STARTS, COUNTS, 1, l_len)
    for j in range(0, l_len, KB):
        s0 = s0_nx
        c0 = c0_nx
        s1 = s1_nx
        c1 = c1_nx
        s0_nx, c0_nx = _key_block(p_col, STARTS, COUNTS, j + KB, l_len)
        if KB == 2:
            s1_nx, c1_nx = _key_block(p_col, STARTS, COUNTS, j + KB + 1, l_len)
            m_n = o_r < tl.where(o_t < BLOCK, c0, c1)  # [2*BLOCK] (count 0 past the end of the list)
            o_row = tl.where(o_t < BLOCK, s0, s1).to(tl.int64) + o_r
        else:
            m_n = o_t < c0  # [BLOCK]
            o_row = s0.to(tl.int64) + o_t
        if TMA:
            # whole [BLOCK, D] boxes: rows past the block's count are the head's next tokens (masked out of the
            # scores below; a non-finite value there poisons the head anyway) or zeros past the sequence
            b_k = K_DESC.load([i_b.to(tl.int32), s0, (i_h * D).to(tl.int32)]).reshape(BLOCK, D)
            b_v = V_DESC.load([i_b.to(tl.int32), s0, (i_h * D).to(tl.int32)]).reshape(BLOCK, D)
        else:
            b_k = tl.load(p_k0 + o_row[:, None] * sk_n, mask=m_n[:, None], other=0.0)  # [KB*BLOCK, D]
            b_v = tl.load(p_v0 + o_row[:, None] * sv_n, mask=m_n[:, None], other=0.0)  # [KB*BLOCK, D]
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BLOCK, KB*BLOCK]
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))  # [BLOCK, KB*BLOCK]
        # scale and key mask in one FMA; every exact tile holds a valid key, so b_mn is finite (no guard)
        b_s = b_s * scale_log2 + tl.where(m_n, 0.0, float("-inf"))[None, :]
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.math.exp2(b_s - b_mn[:, None])  # [BLOCK, KB*BLOCK]
        b_alpha = tl.math.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")  # [BLOCK, D]
        else:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)  # [BLOCK, D]
        b_m = b_mn

    b_poison = tl.load(POISON + i_bh64 * D + o_d)  # [D] 0, or NaN for a non-finite k / v of the head
    b_o = b_acc / b_l[:, None] + b_poison[None, :]  # l = 0 (no key at all) gives NaN, as the reference
    p_o = O + i_b * so_b + i_h * so_h + (q_start + o_m)[:, None] * so_n + o_d[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None])


_sparse_attn_fwd_tuned = triton.autotune(
    # nb in the key: a problem of another size is tuned again (a pipeline repeats a few shapes)
    configs=_configs(), key=["D", "BLOCK", "IEEE", "nb", "TMA_OK", "C"], prune_configs_by={"early_config_prune": _prune}
)(_sparse_attn_fwd_kernel)


# ---------------------------------------------------------------------------------------------- host
def _ineligible(q: torch.Tensor, block_size: int) -> Optional[Tuple[type, str]]:
    """(exception type, reason) when the executor cannot run, else None."""
    if not q.is_cuda and not _interpreting():
        return RuntimeError, (f"inputs are on {q.device.type}; the Triton executor needs CUDA "
                              "(or TRITON_INTERPRET=1, which runs it on the CPU for tests)")
    if q.dtype not in SUPPORTED_DTYPES:
        return ValueError, f"dtype {q.dtype} is not supported; supported: float16, bfloat16, float32"
    if q.ndim != 4:
        return ValueError, f"q must be [B, N, H, D], got shape {tuple(q.shape)}"
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return ValueError, f"head_dim={D} is not supported; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return ValueError, (f"block size {block_size} is not supported; "
                            f"supported: {', '.join(map(str, SUPPORTED_BLOCK_SIZES))}")
    if q.stride(-1) != 1:
        return ValueError, f"q has stride {q.stride(-1)} on the head dimension; it needs 1 (call q.contiguous())"
    if q.is_cuda and q.dtype == torch.float32 and block_size > 64:
        return ValueError, (f"float32 inputs on CUDA support block sizes up to 64 (block size {block_size} does not fit "
                            "in shared memory without tensor cores); use float16 / bfloat16 inputs or block_size <= 64")
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return RuntimeError, (f"compute capability {major}.{minor} is too old; the Triton executor needs 8.0 "
                                  "or newer (Ampere, Ada, Hopper)")
    return None


def sparse_ineligible(q: torch.Tensor, plan: BlockPlan) -> Optional[str]:
    """Why :func:`execute_block_plan` cannot run a call with this q and plan (None when it can).

    Args:
        q: [B, N, H, D] query tensor (device, dtype, head_dim and stride on D are checked).
        plan: the :class:`~isa_plugin.plan.BlockPlan` to execute; the kernel runs at its block size (its
            pseudo-keys are C = block_size / pseudo_block slots per block).

    Returns:
        A sentence naming the unsupported value and what is supported, or None.

    Example:
        >>> sparse_ineligible(torch.zeros(1, 128, 2, 80), plan)  # doctest: +SKIP
        'head_dim=80 is not supported; supported: 64, 128'
    """
    return sparse_ineligible_for(q, int(plan.blocks.block_size))


def sparse_ineligible_for(q: torch.Tensor, block_size: int) -> Optional[str]:
    """:func:`sparse_ineligible` for a plan of this block size (before the plan is made)."""
    r = _ineligible(q, int(block_size))
    return None if r is None else r[1]


@functools.lru_cache(maxsize=64)
def block_meta(blocks, device: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts int32, counts int32, log2(counts) float32) of a blocking on ``device``, built once."""
    b = blocks.to(device)
    return (b.starts.to(torch.int32).contiguous(), b.counts.to(torch.int32).contiguous(),
            torch.log2(b.counts.to(torch.float32)).contiguous())


def sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_keep: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    starts: torch.Tensor, counts: torch.Tensor, log2n: torch.Tensor,
    block_size: int, scale: float,
    out: Optional[torch.Tensor] = None, config: Optional[dict] = None,
    pseudo_block: Optional[int] = None, iters: int = 0,
) -> torch.Tensor:
    """Host launcher: pool k̄ / v̄ (or the pseudo-key slots), build the KV' lists, bit sets and work order on the
    device, launch.

    The caller (:func:`execute_block_plan`) has validated the arguments; no device value is read here.

    Args:
        q, k, v: [B, N, H, D], unit stride on D. kv_keep: [B, H, nb] bool. row_ptr: [B, H, nb + 1],
            col_idx: [B, H, nnz] (int64 or int32). starts, counts: [nb] int32; log2n: [nb] float32.
        block_size: the blocking's nominal block size (every count <= block_size).
        scale: softmax scale.
        out: optional [B, N, H, D] buffer in q's dtype (every element is written).
        config: launch these meta-parameters (``{"KB", "BP", "num_warps", "num_stages", "TMA"}``) instead of the
            autotuned ones (tests use it to cover every tile shape under the interpreter).
        pseudo_block: tokens per starting pseudo-key slot (divides ``block_size``; default: one block mean per block).
        iters: Lloyd iterations of the slots (0: sub-block means; :data:`~isa_plugin.kernels.pseudo.KMEANS_ITERS`:
            k-means pseudo-keys).

    Returns:
        ``out`` ([B, N, H, D] in q's dtype).

    Raises:
        ValueError: unknown keys in ``config``.
    """
    if config is not None and set(config) - {"KB", "BP", "num_warps", "num_stages", "TMA"}:
        raise ValueError(f"unknown launch parameters {sorted(set(config) - {'KB', 'BP', 'num_warps', 'num_stages', 'TMA'})}; "
                         "known: KB, BP, num_warps, num_stages, TMA")
    prepared = _prepare(q, k, v, kv_keep, row_ptr, col_idx, starts, counts, log2n, block_size, scale, out,
                        pseudo_block, iters)
    _launch(prepared, config)
    return prepared["out"]


def _prepare(q, k, v, kv_keep, row_ptr, col_idx, starts, counts, log2n, block_size, scale, out=None,
             pseudo_block=None, iters=0) -> dict:
    """Everything before the attention kernel (device work only): the pseudo-keys (pooled k̄ / v̄, or C slots per
    block) and the poison row, the KV' lists, the exact-block bit sets and the work order. Returns the kernel's
    arguments."""
    B, N, H, D = q.shape
    nb = int(starts.shape[0])
    if out is None:
        out = torch.empty_like(q)
    if B * H * nb == 0 or N == 0:
        return {"out": out, "grid": None}
    bs = int(block_size)
    n_slots = bs // int(pseudo_block or bs)
    if n_slots > 1:
        kbar, vbar, log2n, poison = pseudo_slots_triton(k, v, starts, counts, bs, int(pseudo_block), iters)
        s_lg = nb * n_slots
    else:
        if k.stride() == v.stride():
            kbar, vbar = pool_blocks_triton(k, v, starts=starts, counts=counts, block_size=bs)
        else:
            kbar = pool_blocks_triton(k, starts=starts, counts=counts, block_size=bs)[0]
            vbar = pool_blocks_triton(v, starts=starts, counts=counts, block_size=bs)[0]
        # dense attention turns a non-finite k anywhere in a head (v: in a feature column) into NaN: keep that
        poison = (kbar.sum(dim=(2, 3))[..., None] + vbar.sum(dim=2)) * 0  # [B, H, D] float32
        kbar = kbar.to(q.dtype).reshape(B * H, nb, D)
        vbar = vbar.to(q.dtype).reshape(B * H, nb, D)
        s_lg = 0  # one log2 count per block, shared by the heads
    keep = kv_keep.reshape(B * H, nb)
    # kept blocks first, ascending (stable sort on the dropped flag)
    kv_list = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    kv_len = keep.sum(-1, dtype=torch.int32)
    rp = row_ptr.reshape(B * H, nb + 1).contiguous()
    ci = col_idx.reshape(B * H, -1).contiguous()
    nnz = int(ci.shape[-1])
    # longest lists first; the stable sort keeps (b, h)-major order among equal lengths (L2 locality)
    order = torch.sort((rp[:, 1:] - rp[:, :-1]).reshape(-1), descending=True, stable=True).indices.to(torch.int32)
    # every row's exact blocks as a bit set (the tail's membership test: one gathered word per candidate)
    n_words = (nb + 31) // 32
    bits = torch.empty(B * H * nb, n_words, device=q.device, dtype=torch.int32)
    _exact_bits_kernel[(B * H * nb,)](rp, ci, bits, nb, nnz, n_words, CH=64, WP=max(2, triton.next_power_of_2(n_words)), num_warps=4)
    BLOCK = max(16, triton.next_power_of_2(bs))
    descs = _tma_descriptors(k, v, BLOCK)
    args = (
        q, k, v, out, *(descs or (k, v)), kbar, vbar, log2n, poison, starts, counts, rp, ci, kv_list, kv_len, bits, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, nb, nnz, n_words, float(scale) * _LOG2E, s_lg,
    )
    consts = {"D": D, "BLOCK": BLOCK, "IEEE": q.dtype == torch.float32, "TMA_OK": descs is not None, "C": n_slots}
    return {"out": out, "grid": (B * H * nb,), "args": args, "consts": consts}


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, block: int):
    """Host TMA descriptors of k and v as [B, N, H*D] with [1, block, D] boxes, or None where TMA cannot serve them
    (before Hopper, float32, a head stride other than D, unaligned strides or data)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover
        return None
    if k.dtype not in (torch.float16, torch.bfloat16) or (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9):
        return None
    if not k.is_cuda and not _interpreting():
        return None
    B, N, H, D = k.shape
    out = []
    for t in (k, v):
        sb, sn, sh, sd = t.stride()
        if sd != 1 or sh != D or (sb * t.element_size()) % 16 or (sn * t.element_size()) % 16 or t.data_ptr() % 16:
            return None
        out.append(TensorDescriptor(t, [B, N, H * D], [sb, sn, 1], [1, block, D]))
    return tuple(out)


def _launch(prepared: dict, config: Optional[dict] = None, exact_only: bool = False) -> None:
    """The attention kernel on :func:`_prepare`'s arguments (autotuned, or with ``config``); ``exact_only`` skips the
    pseudo-key tail (a benchmark times the exact part with it; the output is then not the plan's)."""
    if prepared["grid"] is None:
        return
    grid, args, consts = prepared["grid"], prepared["args"], dict(prepared["consts"], TAIL=not exact_only)
    if config is None:
        _sparse_attn_fwd_tuned[grid](*args, **consts)
    else:
        if config.get("TMA", False) and not consts["TMA_OK"]:
            raise ValueError("config TMA=True but these k, v cannot be loaded through TMA descriptors")
        _sparse_attn_fwd_kernel[grid](
            *args, **consts, KB=config.get("KB", 1), BP=config.get("BP", 64), TMA=config.get("TMA", False),
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 1),
        )


@torch.library.custom_op("isa_plugin::sparse_attn", mutates_args=())
def sparse_attn_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_keep: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    starts: torch.Tensor, counts: torch.Tensor, log2n: torch.Tensor,
    block_size: int, scale: float, pseudo_block: int, iters: int,
) -> torch.Tensor:
    """``isa_plugin::sparse_attn``: :func:`sparse_attn_fwd` as one opaque node for ``torch.compile``."""
    return sparse_attn_fwd(q, k, v, kv_keep, row_ptr, col_idx, starts, counts, log2n, block_size, scale,
                           pseudo_block=pseudo_block, iters=iters)


@sparse_attn_op.register_fake
def _(q, k, v, kv_keep, row_ptr, col_idx, starts, counts, log2n, block_size, scale, pseudo_block, iters):
    return torch.empty_like(q)


def _check_inputs(q, k, v, plan: BlockPlan) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan must be an isa_plugin.plan.BlockPlan, got {type(plan).__name__}")
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, N, H, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype} (cast them to one)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, N, H, _ = q.shape
    pB, pH, nb = plan.shape
    if (pB, pH) != (B, H):
        raise ValueError(f"the plan is for batch {pB} and {pH} heads but q has batch {B} and {H} heads "
                         "(plan the call with these inputs; BlockPlan.expand_batch shares a batch-1 plan)")
    if plan.blocks.num_tokens != N or plan.blocks.num_blocks != nb:
        raise ValueError(f"the plan's blocking covers {plan.blocks.num_tokens} tokens in {plan.blocks.num_blocks} blocks "
                         f"but q has N={N} tokens (and kv_keep {nb} blocks); plan the call with this layout")
    for name in ("kv_keep", "row_ptr", "col_idx"):
        t = getattr(plan, name)
        if t.device != q.device:
            raise ValueError(f"plan.{name} is on {t.device} but q is on {q.device}; build the plan on q's device")
    if plan.row_ptr.shape != (B, H, nb + 1) or plan.col_idx.ndim != 3 or plan.col_idx.shape[:2] != (B, H):
        raise ValueError(f"plan.row_ptr {tuple(plan.row_ptr.shape)} / col_idx {tuple(plan.col_idx.shape)} do not match "
                         f"[B, H, nb + 1] = {(B, H, nb + 1)} / [B, H, nnz]")
    for name in ("row_ptr", "col_idx"):
        if getattr(plan, name).dtype not in (torch.int64, torch.int32):
            raise ValueError(f"plan.{name} has dtype {getattr(plan, name).dtype}; it must be int64 (or int32)")
    if plan.kv_keep.dtype != torch.bool:
        raise ValueError(f"plan.kv_keep has dtype {plan.kv_keep.dtype}; it must be bool")


def execute_block_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Run ``plan`` on q, k, v with the Triton block-sparse executor: exact key blocks plus pseudo-keys in one
    softmax, the semantics of :func:`~isa_plugin.kernels.reference.execute_plan_reference`.

    Query block i of head (b, h) attends to every token of the key blocks in its exact list
    ``plan.col_idx[b, h, plan.row_ptr[b, h, i] : plan.row_ptr[b, h, i + 1]]`` and to the pseudo-keys of
    every other kept block j (``plan.kv_keep``): with ``plan.pseudo_block`` equal to the block size one
    pseudo-key, key k̄_j, value v̄_j (block means over the true count n_j), logit bias ln(n_j); else
    block_size / pseudo_block slots (sub-block means or k-means centroids, ``plan.pseudo_keys``), each with
    the bias ln of its count. Dropped blocks take no part. A row whose exact list is empty attends to
    pseudo-keys only; a head with no kept block gives NaN rows, and a non-finite value anywhere in a
    head's k (v) gives NaN outputs for that head (those feature columns), as dense attention would.

    The call reads no device value on the host and can be captured in a CUDA graph once a first call has
    autotuned the kernel for its (head_dim, block size, dtype, slots per block).

    Args:
        q, k, v: [B, N, H, D] (diffusers' layout), one dtype (float16, bfloat16 or float32) and device,
            unit stride on D for q (k and v are copied when they lack one). D = 64 or 128.
        plan: a :class:`~isa_plugin.plan.BlockPlan` for this call (batch B, H heads, a blocking of N
            tokens), its tensors on q's device. Its lists are trusted, not checked (that would read them
            on the host): block ids in [0, nb), ascending, within KV' (``BlockPlan.from_masks`` ensures
            this); anything else is undefined behaviour.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, N, H, D] in q's dtype.

    Raises:
        TypeError: q, k, v that are not tensors, or a plan that is not a ``BlockPlan``.
        ValueError: shapes, dtypes or devices that differ, a plan for another shape or device, an
            unsupported dtype / head_dim / block size, a non-unit stride on q's head dimension, or a
            non-finite scale.
        RuntimeError: no CUDA device (and no TRITON_INTERPRET=1), or a GPU older than compute
            capability 8.0.

    Example:
        >>> blocks = Layout([("target", 4096), ("context", 4096)]).blocks(128)
        >>> keep = torch.ones(1, 8, blocks.num_blocks, dtype=torch.bool, device="cuda")  # doctest: +SKIP
        >>> exact = torch.rand(1, 8, blocks.num_blocks, blocks.num_blocks, device="cuda") < 0.25  # doctest: +SKIP
        >>> plan = BlockPlan.from_masks(blocks.to("cuda"), keep, exact, pseudo_block=128)  # doctest: +SKIP
        >>> out = execute_block_plan(q, k, v, plan)  # doctest: +SKIP
    """
    _check_inputs(q, k, v, plan)
    bad = _ineligible(q, int(plan.blocks.block_size))
    if bad is not None:
        raise bad[0](bad[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale} must be finite (default 1/sqrt(head_dim))")
    bs = plan.blocks.block_size
    if plan.pseudo_block < 1 or bs % plan.pseudo_block:
        raise ValueError(f"plan.pseudo_block={plan.pseudo_block} must divide the block size {bs}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    starts, counts, log2n = block_meta(plan.blocks, str(q.device))
    return sparse_attn_op(q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n,
                          int(bs), scale, int(plan.pseudo_block), plan.pseudo_key_iterations)
