"""Calibration measurement of any plan: errors against dense attention on sampled tokens, and pair counts.

For one attention call (one batch entry) and a set of candidate plans, :func:`measure_plans` estimates
per head the relative L1 error of every plan's output against dense attention, separately for
target-query and context-query outputs, and counts the exact and pseudo pairs of every plan. The outputs
are computed on sampled tokens of sampled query blocks only, each token weighted by (block tokens / sampled
tokens of its block). For a sampled token t the exact scores against all keys give, per key block j,
Y[t, j] = Σ_{r∈j} e^{s_tr−m_t} v_r and Z[t, j]; per pseudo-key σ of size c_σ, A[t, σ] = c_σ e^{q_t·k̄_σ·scale−m_t}.
Every plan's output is then (Σ_exact Y + Σ_pseudo A v̄) / (Σ_exact Z + Σ_pseudo A): one score pass serves
every plan and pseudo-key size.

A mode without a measurement of its own is calibrated this way (:meth:`SelectionMode.measure`). The
adaptive mode measures its ordered-prefix plans with the same sampling (:func:`sample_blocks`) and score
pass (``ordered_measure``); the fixed mode has a specialised measurement (``fixed_measure``) that covers its
much larger grid without planning every candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..kernels.reference import pool_blocks
from ..layout import CONTEXT, TARGET, BlockLayout, Layout
from ..plan import BlockPlan

__all__ = ["Sampler", "SampledCall", "SampledBlocks", "single_entry", "sampled_call", "sample_blocks", "sample_tokens",
           "batched_mm", "block_terms", "measure_plans"]


@dataclass
class Sampler:
    """How a calibration samples query tokens: blocks per query kind, tokens per block, and the generator."""

    blocks_per_kind: int = 48
    tokens_per_block: int = 16
    generator: Optional[torch.Generator] = None


def single_entry(q, k, v, layout: Layout, scale: Optional[float], caller: str):
    """The measurement functions' inputs: one batch entry's q, k, v as [N, H, D] (a leading batch of 1 is
    dropped), checked against ``layout``, with the compute dtype (fp64 for fp64 inputs, else fp32) and the
    softmax scale (default 1/sqrt(D))."""
    if q.ndim == 4:
        if q.shape[0] != 1:
            raise ValueError(f"{caller} takes one batch entry; got q of shape {tuple(q.shape)}")
        q, k, v = q[0], k[0], v[0]
    layout.check(q.shape[0])
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, k, v, ct, sc


@dataclass
class SampledCall:
    """One call prepared for :func:`measure_plans`: [N, H, D] inputs, the blocking and the block means."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ct: torch.dtype
    scale: float
    blocks_cpu: BlockLayout
    blocks: BlockLayout
    qbar: torch.Tensor  # [1, H, nb, D]
    kbar: torch.Tensor
    block_size: int
    sampler: Sampler


def sampled_call(q, k, v, layout: Layout, block_size: int, sampler: Sampler, scale: Optional[float] = None) -> Optional[SampledCall]:
    """Prepare one call (one batch entry) for :func:`measure_plans`; None when it has nothing to measure
    (fewer than two blocks, or no target / context query block)."""
    q, k, v, ct, sc = single_entry(q, k, v, layout, scale, "measure")
    blocks_cpu = layout.blocks(block_size)
    if blocks_cpu.num_blocks < 2 or not bool(((blocks_cpu.kinds == TARGET) | (blocks_cpu.kinds == CONTEXT)).any()):
        return None
    blocks = blocks_cpu.to(q.device)
    return SampledCall(q, k, v, ct, sc, blocks_cpu, blocks, pool_blocks(q[None], blocks), pool_blocks(k[None], blocks),
                       block_size, sampler)


@dataclass
class SampledBlocks:
    """The query blocks and tokens a measurement samples, grouped by block (:func:`sample_blocks`).

    Attributes:
        blocks: [S] int64, the sampled query blocks (target ones first, then context ones).
        kinds: [S] int64, 0 target, 1 context.
        tokens: [S, M] int64, the sampled tokens of each block (M = the most any block has); a block with
            fewer repeats its first sampled token in the slots it does not use.
        weights: [S, M] float64, block tokens / sampled tokens of the block; 0 on unused slots.
    """

    blocks: torch.Tensor
    kinds: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor

    def to(self, device) -> "SampledBlocks":
        return SampledBlocks(*(t.to(device) for t in (self.blocks, self.kinds, self.tokens, self.weights)))


def sample_blocks(blocks_cpu, sampler: Sampler) -> SampledBlocks:
    """The plan measurements' sampling: per query kind (target, then context) up to ``blocks_per_kind`` blocks,
    then in each up to ``tokens_per_block`` tokens, all drawn without replacement from ``sampler.generator``."""
    picks, kinds, toks, wts = [], [], [], []
    for kind_id, kk in ((0, TARGET), (1, CONTEXT)):
        cand = torch.nonzero(blocks_cpu.kinds == kk).flatten()
        if cand.numel() == 0:
            continue
        pick = cand[torch.randperm(cand.numel(), generator=sampler.generator)[: min(sampler.blocks_per_kind, cand.numel())]]
        for blk in pick.tolist():
            n = int(blocks_cpu.counts[blk])
            m = min(sampler.tokens_per_block, n)
            offs = torch.randperm(n, generator=sampler.generator)[:m]
            picks.append(blk)
            kinds.append(kind_id)
            toks.append(int(blocks_cpu.starts[blk]) + offs)
            wts.append(torch.full((m,), n / m, dtype=torch.float64))
    width = max(t.numel() for t in toks)
    tokens = torch.stack([torch.cat([t, t[:1].expand(width - t.numel())]) for t in toks])
    weights = torch.stack([torch.cat([w, w.new_zeros(width - w.numel())]) for w in wts])
    return SampledBlocks(torch.tensor(picks, dtype=torch.int64), torch.tensor(kinds, dtype=torch.int64), tokens, weights)


def sample_tokens(blocks_cpu, sampler: Sampler):
    """The tokens of :func:`sample_blocks`, flat: query tokens [T], their weights [T] (float64) and kinds [T]
    (0 target, 1 context)."""
    s = sample_blocks(blocks_cpu, sampler)
    used = s.weights > 0
    return s.tokens[used], s.weights[used], s.kinds[:, None].expand_as(used)[used]


def batched_mm(x: torch.Tensor, y: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.matmul(x, y, out=out)`` for x, y of equal rank >= 3; a leading dim of 1 is dropped for the product
    (on the CPU a batch of one runs single-threaded, and a 3-d product of strided operands needs no copy)."""
    if x.ndim >= 3 and x.ndim == y.ndim and x.shape[0] == 1 and y.shape[0] == 1:
        return torch.matmul(x[0], y[0], out=None if out is None else out[0])[None]
    return torch.matmul(x, y, out=out)


def block_terms(qs: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, key_valid: Optional[torch.Tensor]):
    """Exact softmax terms of sampled query tokens per key block (the plan measurements' score pass).

    Args:
        qs: [..., t, D] query tokens, the softmax scale folded in (leading dims: e.g. a group of heads).
        kp, vp: [..., nb, b, D] keys and values laid out per block (zero on slots past a short block's end).
        key_valid: [nb, b] bool, the slots that hold a token; None when every block is full.

    Returns:
        ``(m, Z, Y, dense)``: row maxima m [..., t]; Z [..., t, nb] = Σ_{r∈j} e^{s_tr−m_t}; Y [..., nb, t, D] =
        Σ_{r∈j} e^{s_tr−m_t} v_r; the dense output [..., t, D].
    """
    t, D = qs.shape[-2:]
    nb, b = kp.shape[-3:-1]
    e = batched_mm(qs, kp.reshape(*kp.shape[:-3], nb * b, D).transpose(-1, -2)).view(*qs.shape[:-2], t, nb, b)
    if key_valid is not None:
        e.masked_fill_(~key_valid, float("-inf"))
    m = e.amax(dim=(-2, -1))
    e = e.sub_(m[..., None, None]).exp_()
    Z = e.sum(-1)
    Y = batched_mm(e.transpose(-3, -2), vp)
    return m, Z, Y, Y.sum(-3) / Z.sum(-1)[..., None]


@torch.no_grad()
def measure_plans(call: SampledCall, plans: Dict[Tuple[int, ...], BlockPlan], pseudo_block: Sequence[int],
                  key_shape: Tuple[int, ...], max_chunk_elems: int = 1 << 26) -> Dict[str, torch.Tensor]:
    """Errors and pair counts of several plans of one call over several pseudo-key sizes.

    Args:
        call: from :func:`sampled_call`.
        plans: candidate key (a tuple indexing ``key_shape``) -> that candidate's plan (batch 1; its own
            pseudo-key size is ignored: every size of ``pseudo_block`` is measured).
        pseudo_block: the pseudo-key sizes (each divides the block size).
        key_shape: the shape the candidate keys index.
        max_chunk_elems: bound on the transient [tokens, N] buffers.

    Returns:
        ``{"num": [H, 2, *key_shape, PS], "den": [H, 2], "pairs": [H, *key_shape, PS, 2, 2]}`` float64 on the
        inputs' device: Σ|o − o*|₁ and Σ|o*|₁ over sampled tokens per query kind (target, context), and the
        (exact, pseudo) pairs of the plan's rows of non-context (target and text) and of context query blocks.
    """
    q, k, v, ct, sc = call.q, call.k, call.v, call.ct, call.scale
    N, H, D = q.shape
    dev = q.device
    PS = len(pseudo_block)
    block_size = call.block_size
    blocks, blocks_cpu = call.blocks, call.blocks_cpu
    nb = blocks.num_blocks
    out = {"num": torch.zeros(H, 2, *key_shape, PS, dtype=torch.float64, device=dev),
           "den": torch.zeros(H, 2, dtype=torch.float64, device=dev),
           "pairs": torch.zeros(H, *key_shape, PS, 2, 2, dtype=torch.float64, device=dev)}
    is_c = blocks.kinds == CONTEXT
    masks = {}
    for key, plan in plans.items():
        exact = plan.exact_mask()
        masks[key] = (plan.kv_keep[0], exact[0])  # [H, nb], [H, nb, nb]
        for psi, ps in enumerate(pseudo_block):
            sized = BlockPlan.from_masks(plan.blocks, plan.kv_keep, exact, ps)
            for kid, rows in enumerate((~is_c, is_c)):
                e, a = sized.pair_counts(per_head=True, query_blocks=rows)
                out["pairs"][(slice(None), *key, psi, kid, 0)] = e
                out["pairs"][(slice(None), *key, psi, kid, 1)] = a

    tok, w, kind = sample_tokens(blocks_cpu, call.sampler)
    tok, w, kind = tok.to(dev), w.to(dev), kind.to(dev)
    qb = blocks.token_block[tok]  # [T]
    T = tok.numel()
    ar = torch.arange(block_size, device=dev)
    key_idx = blocks.starts[:, None] + ar[None, :]
    key_valid = ar[None, :] < blocks.counts[:, None]
    key_idx = torch.where(key_valid, key_idx, torch.zeros_like(key_idx))
    subs = [blocks_cpu.split(ps) for ps in pseudo_block]
    subs = [(sb.to(dev), parent.to(dev)) for sb, parent in subs]
    chunk = max(1, max_chunk_elems // max(1, N + nb * D))
    for h in range(H):
        kh, vh = k[:, h].to(ct), v[:, h].to(ct)
        kp, vp = kh[key_idx] * key_valid[..., None], vh[key_idx] * key_valid[..., None]  # [nb, b, D]
        pseudo = []
        for sb, parent in subs:
            kb = pool_blocks(k[None, :, h : h + 1], sb)[0, 0]  # [n_sub, D]
            vb = pool_blocks(v[None, :, h : h + 1], sb)[0, 0]
            pseudo.append((kb, vb, sb.counts.to(ct), parent))
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            qs = q[tok[c0:c1], h].to(ct) * sc  # [t, D]
            m, Z, Y, dense = block_terms(qs, kp, vp, key_valid)
            Y = Y.transpose(0, 1)  # [t, nb, D]
            ww, kd = w[c0:c1], kind[c0:c1]
            ref = dense.abs().sum(-1).double() * ww
            for kid in range(2):
                out["den"][h, kid] += ref[kd == kid].sum()
            A = [(cnt * torch.exp(qs @ kb.T - m[:, None]), vb, parent) for kb, vb, cnt, parent in pseudo]
            qbc = qb[c0:c1]
            for key, (keep, exact) in masks.items():
                ex = exact[h][qbc]  # [t, nb] bool
                wx = ex.to(ct)
                num_x = torch.bmm(wx[:, None, :], Y)[:, 0]
                den_x = (wx * Z).sum(-1)
                ap_blk = keep[h][None, :] & ~ex  # [t, nb]
                for psi, (a, vb, parent) in enumerate(A):
                    aw = ap_blk[:, parent].to(ct) * a
                    o = (num_x + aw @ vb) / (den_x + aw.sum(-1))[:, None]
                    err = (o - dense).abs().sum(-1).double() * ww
                    for kid in range(2):
                        out["num"][(h, kid, *key, psi)] += err[kd == kid].sum()
    return out
