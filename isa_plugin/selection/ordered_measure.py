"""Calibration measurement of ordered-prefix plans: every threshold of a fine grid from one pass.

An *ordered-prefix family* of plans of one call fixes, per head, the kept key blocks (KV'), the key blocks every
query block computes exactly (``always``: the kept text blocks) and, per query block i, an order of the other
kept key blocks (the candidates); the family's plan number g makes the first ``counts[i, g]`` candidates of
query block i exact and every other kept block pseudo-keys. The adaptive mode's plans for every mass of a grid
are such a family (its order is the pooled mass, descending; the mass only sets the count).

For a sampled query token t let Y[t, j], Z[t, j] be the exact softmax numerator and denominator of key block j
(as in :mod:`.measure`), A[t, j], a[t, j] those of block j's pseudo-keys, and o*_t the dense output. The output
of a plan with exact candidate set E is (num / den) with

    num − den·o*_t = base_t + Σ_{j∈E} (Y' − A')[t, j],     den = Z_always + a_cand + Σ_{j∈E} (Z − a)[t, j],

Y' = Y − Z·o*, A' = A − a·o* and base_t = Σ_always Y' + Σ_cand A' (the plan with no exact candidate), so
|o_t − o*_t|₁ = |num − den·o*_t|₁ / den. One score pass per sampled token gives the terms of every key block
and pseudo-key size; every plan of every family is then a row of 0/1 weights over the key blocks (its exact
candidates, and its family's base term), and one matrix product per sampled query block gives every plan's
output difference. Plans of a query block with the same count are the same plan and are evaluated once, so
the product grows with the number of distinct counts (at most the number of thresholds, and K' + 1 per
family), the score pass not at all. Pair counts come from cumulative token counts along the order.
Sampling, weights and the dense reference are those of :mod:`.measure` (the same sampled tokens for the same
sampler state); with every token sampled the errors equal the reference ISA's (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.pseudo import kmeans_slots, padded_blocks
from ..kernels.reference import pool_blocks
from ..layout import CONTEXT, TEXT
from .measure import SampledCall, batched_mm, block_terms, sample_blocks

__all__ = ["OrderedFamily", "measure_ordered"]


@dataclass
class OrderedFamily:
    """One ordered-prefix family of plans of a call (batch entry dropped).

    Attributes:
        keep: [H, nb] bool, KV'.
        always: [H, nb] bool, key blocks exact for every query block (within ``keep``).
        order: [H, nb, nb] int64, per query block the key blocks with the candidates (``keep & ~always``)
            first, in the order they become exact.
        counts: [H, nb, G] int64, per query block and plan the number of exact candidates (0 … #candidates).
    """

    keep: torch.Tensor
    always: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor


@dataclass
class _PseudoKeys:
    """The pseudo-keys of one variant (s, kind): sub-blocks of s tokens of every block (the last one of a block
    short), or as many k-means slots per block (:mod:`isa_plugin.kernels.pseudo`).

    Attributes:
        kbar, vbar: [H, n_sub, D] pseudo-key keys and values.
        counts: [H, n_sub] their token counts (0: an empty k-means slot, no weight).
        parent: [n_sub] int64, each pseudo-key's block.
        slot: [nb, ⌈b/s⌉] int64, each block's pseudo-keys (n_sub for an empty slot).
        vslot: [H, nb, ⌈b/s⌉, D] the values per block slot (0 in an empty one).
    """

    kbar: torch.Tensor
    vbar: torch.Tensor
    counts: torch.Tensor
    parent: torch.Tensor
    slot: torch.Tensor
    vslot: torch.Tensor

    @classmethod
    def of(cls, k, v, blocks_cpu, s: int, kind: str, ct: torch.dtype) -> "_PseudoKeys":
        if kind != "mean" and s < blocks_cpu.block_size:
            return cls.kmeans(k, v, blocks_cpu, s, ct)
        sub, parent = blocks_cpu.split(s)
        n_sub, nb = int(parent.numel()), blocks_cpu.num_blocks
        first = torch.cumsum(torch.bincount(parent, minlength=nb), 0) - torch.bincount(parent, minlength=nb)
        slot = torch.full((nb, -(-blocks_cpu.block_size // s)), n_sub, dtype=torch.int64)
        slot[parent, torch.arange(n_sub) - first[parent]] = torch.arange(n_sub)
        dev = k.device
        kbar = pool_blocks(k[None], sub.to(dev))[0].to(ct)
        vbar = pool_blocks(v[None], sub.to(dev))[0].to(ct)
        slot = slot.to(dev)
        vslot = torch.cat([vbar, vbar.new_zeros(vbar.shape[0], 1, vbar.shape[-1])], 1)[:, slot]
        return cls(kbar, vbar, sub.counts.to(dev, ct).expand(k.shape[1], -1), parent.to(dev), slot, vslot)

    @classmethod
    def kmeans(cls, k, v, blocks_cpu, s: int, ct: torch.dtype) -> "_PseudoKeys":
        """k-means slots of k, v [N, H, D]: every block has C = b/s slots, an empty one counts 0 (its key, the
        slot's last centroid, is a mean of the block's keys, so its score never exceeds the row maximum)."""
        k_blk, valid = padded_blocks(k[None], blocks_cpu, ct)
        v_blk, _ = padded_blocks(v[None], blocks_cpu, ct)
        cent, vals, cnt = kmeans_slots(k_blk[0], v_blk[0], valid, s)  # [H, nb, C, D], ..., [H, nb, C]
        H, nb, C, D = cent.shape
        dev = k.device
        parent = torch.arange(nb, device=dev).repeat_interleave(C)
        return cls(cent.reshape(H, nb * C, D), vals.reshape(H, nb * C, D), cnt.reshape(H, nb * C), parent,
                   torch.arange(nb * C, device=dev).view(nb, C), vals)


def _pairs(call: SampledCall, fam: OrderedFamily, pseudo_block: Sequence[int]) -> torch.Tensor:
    # (a k-means slot counts like the sub-block it starts as: the pairs depend on s only)
    """[H, G, PS, 2 (rows: non-context, context), 2 (exact, pseudo)] float64 pair counts of the family's plans."""
    blocks = call.blocks
    cnt = blocks.counts.to(fam.order.device, torch.float64)  # [nb]
    H, nb, G = fam.counts.shape
    cand = fam.keep & ~fam.always  # [H, nb]
    rows = torch.stack([cnt * (blocks.kinds != CONTEXT), cnt * (blocks.kinds == CONTEXT)])  # [2, nb]
    out = torch.zeros(H, G, len(pseudo_block), 2, 2, dtype=torch.float64, device=fam.order.device)
    zero = torch.zeros(H, nb, 1, dtype=torch.float64, device=fam.order.device)
    for psi, s in enumerate(pseudo_block):
        n_ps = torch.ceil(cnt / s)
        ex_prefix = torch.cat([zero, torch.cumsum(cnt[fam.order], -1)], -1).gather(-1, fam.counts)  # [H, nb, G]
        ps_prefix = torch.cat([zero, torch.cumsum(n_ps[fam.order], -1)], -1).gather(-1, fam.counts)
        exact = (fam.always.double() @ cnt)[:, None, None] + ex_prefix
        pseudo = (cand.double() @ n_ps)[:, None, None] - ps_prefix
        out[:, :, psi, :, 0] = torch.einsum("hig,ki->hgk", exact, rows)
        out[:, :, psi, :, 1] = torch.einsum("hig,ki->hgk", pseudo, rows)
    return out


@dataclass
class _Plans:
    """The distinct plans of a group of heads per sampled query block, per family (lists of F tensors).

    Attributes:
        rank: [h, S, nb] int64, each key block's position in the block's order (candidates first).
        counts: [h, S, G] int64, the distinct exact counts of the block's plans first (then the last one repeated,
            so a padded plan is a copy of a real one).
        index: [h, S, G] int64, each plan's position in ``counts``.
        size: [F, h, S] int64 on the CPU, the number of distinct counts per family, head and block.
    """

    rank: List[torch.Tensor]
    counts: List[torch.Tensor]
    index: List[torch.Tensor]
    size: torch.Tensor

    @classmethod
    def of(cls, families: Sequence[OrderedFamily], heads: slice, blocks: torch.Tensor) -> "_Plans":
        rank, counts, index = [], [], []
        for fam in families:
            o = fam.order[heads][:, blocks]  # [h, S, nb]
            rank.append(torch.empty_like(o).scatter_(-1, o, torch.arange(o.shape[-1], device=o.device).expand_as(o)))
            c = fam.counts[heads][:, blocks]  # [h, S, G]
            new = torch.ones_like(c, dtype=torch.bool)
            new[..., 1:] = c[..., 1:] != c[..., :-1]
            idx = torch.cumsum(new, -1) - 1
            index.append(idx)
            counts.append(c[..., -1:].expand_as(c).clone().scatter_(-1, idx, c))
        return cls(rank, counts, index, torch.stack([i[..., -1] + 1 for i in index]).cpu())

    def rows(self, sel_cpu: torch.Tensor, ct: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """For the sampled blocks ``sel_cpu`` [n] (positions in ``blocks``, on the CPU): the 0/1 rows [h, n, R, nb + F]
        of their distinct plans (per family its exact candidates, the first ``counts`` of the order, then a
        one-hot column for the family's base term), and each plan's row [h, n, F·G]."""
        F = len(self.rank)
        sizes = self.size[:, :, sel_cpu].amax((1, 2)).tolist()
        sel = sel_cpu.to(self.rank[0].device)
        rows, index, first = [], [], 0
        for fi in range(F):
            rank = self.rank[fi][:, sel]  # [h, n, nb]
            exact = rank[:, :, None, :] < self.counts[fi][:, sel, : sizes[fi], None]  # [h, n, U, nb]
            family = (torch.arange(F, device=exact.device) == fi).expand(*exact.shape[:3], F)
            rows.append(torch.cat([exact, family], -1))
            index.append(self.index[fi][:, sel] + first)
            first += sizes[fi]
        return torch.cat(rows, 2).to(ct), torch.cat(index, 2)


def _default_chunk_elems(device: torch.device) -> Tuple[int, bool]:
    """The measurement's bound on one chunk's transient buffers (elements), and whether heads are grouped: on a GPU
    2^29 elements and groups of heads, so that a call takes few, large products (the launches, not the products,
    bound the time there); on the CPU 2^24 and one head at a time (a group pads every head's product to the
    group's largest number of distinct plans)."""
    return (1 << 29, True) if device.type == "cuda" else (1 << 24, False)


@torch.no_grad()
def measure_ordered(call: SampledCall, families: Sequence[OrderedFamily], pseudo_variants: Sequence[Tuple[int, str]],
                    max_chunk_elems: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Errors and pair counts of every plan of several ordered-prefix families of one call.

    Args:
        call: from :func:`~isa_plugin.selection.measure.sampled_call`.
        families: F families (e.g. one per α_s) with the same number G of plans.
        pseudo_variants: the pseudo-key variants (s, kind): s divides the block size, kind ``"mean"`` or ``"kmeans"``.
        max_chunk_elems: bound on the transient buffers of one chunk of heads and sampled query blocks (elements;
            default 2^24 on the CPU, one head at a time; 2^29 on a GPU, heads in groups).

    Returns:
        ``{"num": [H, 2, F, G, PS], "den": [H, 2], "pairs": [H, F, G, PS, 2, 2]}`` float64, as
        :func:`~isa_plugin.selection.measure.measure_plans` (Σ|o − o*|₁ and Σ|o*|₁ over sampled tokens per
        query kind; exact and pseudo pairs of the rows of non-context and of context query blocks).
    """
    q, k, v, ct, sc = call.q, call.k, call.v, call.ct, call.scale
    N, H, D = q.shape
    dev = q.device
    F, PS = len(families), len(pseudo_variants)
    pseudo_block = [s for s, _ in pseudo_variants]
    G = families[0].counts.shape[-1]
    b = call.block_size
    blocks, blocks_cpu = call.blocks, call.blocks_cpu
    nb = blocks.num_blocks
    out = {"num": torch.zeros(H, 2, F, G, PS, dtype=torch.float64, device=dev),
           "den": torch.zeros(H, 2, dtype=torch.float64, device=dev),
           "pairs": torch.stack([_pairs(call, f, pseudo_block) for f in families], 1)}

    smp = sample_blocks(blocks_cpu, call.sampler).to(dev)
    S, M = smp.tokens.shape
    ar = torch.arange(b, device=dev)
    key_valid = ar[None, :] < blocks.counts[:, None]
    key_idx = torch.where(key_valid, blocks.starts[:, None] + ar[None, :], torch.zeros((), dtype=torch.int64, device=dev))
    padded = bool((blocks_cpu.counts < b).any())
    has_text = bool((blocks_cpu.kinds == TEXT).any())
    k_pad = k[key_idx].to(ct).mul_(key_valid[..., None, None]).permute(2, 0, 1, 3)  # [H, nb, b, D], zero on padding slots
    v_pad = v[key_idx].to(ct).mul_(key_valid[..., None, None]).permute(2, 0, 1, 3)
    pseudo = [_PseudoKeys.of(k, v, blocks_cpu, s, kind, ct) for s, kind in pseudo_variants]
    R, K = F * G, nb + F
    # heads are measured in groups, sampled blocks in chunks: both as large as the element bound allows
    limit, group = _default_chunk_elems(dev)
    limit = limit if max_chunk_elems is None else max_chunk_elems
    per_block = M * (N + 2 * nb * D + (PS * K + R) * D) + R * K  # elements of one sampled block and head
    hg = H if group else 1
    while hg > 1 and hg * per_block > limit:
        hg = -(-hg // 2)
    chunk = max(1, min(S, limit // (hg * per_block)))
    terms = torch.empty(PS, hg, K, chunk * M, D, dtype=ct, device=dev)  # per key block Y' − A', then per family base
    den_terms = torch.empty(PS, hg, K, chunk * M, dtype=ct, device=dev)  # Z − a, then Z_always + a_cand
    diffs = torch.empty(hg * chunk * R * M * D, dtype=ct, device=dev)  # the plans' num − den·o*
    for h0 in range(0, H, hg):
        hs = slice(h0, min(H, h0 + hg))
        nh = hs.stop - hs.start
        kp, vp = k_pad[hs], v_pad[hs]  # [h, nb, b, D]
        always = torch.stack([f.always[hs] for f in families], 1).to(ct)  # [h, F, nb]
        cand = torch.stack([f.keep[hs] & ~f.always[hs] for f in families], 1).to(ct)
        # the candidates' pseudo-key numerators summed per family are a[t, σ] @ cand_v[σ, (F, D)]
        cand_v = [(cand[:, :, p.parent, None] * p.vbar[hs][:, None]).transpose(1, 2).reshape(nh, -1, F * D) for p in pseudo]
        pl = _Plans.of(families, hs, smp.blocks)
        by_size = torch.argsort(pl.size.sum((0, 1)), stable=True)  # blocks with as many distinct plans together
        for c0 in range(0, S, chunk):
            sel_cpu = by_size[c0 : c0 + chunk]
            sel = sel_cpu.to(dev)
            n = sel.numel()
            t = n * M
            qs = q[smp.tokens[sel].flatten(), hs].to(ct).transpose(0, 1) * sc  # [h, t, D]
            m, Z, Y, dense = block_terms(qs, kp, vp, key_valid if padded else None)  # [h, t], [h, t, nb], [h, nb, t, D], [h, t, D]
            Zt = Z.transpose(1, 2)  # [h, nb, t]
            w, kinds = smp.weights[sel], smp.kinds[sel]  # [n, M], [n]
            ref = (dense.abs().sum(-1).double().view(nh, n, M) * w).sum(-1)  # [h, n]
            for kid in range(2):
                out["den"][hs, kid] += torch.where(kinds == kid, ref, 0.0).sum(-1)
            # every plan's |o − o*|₁ (module docstring): per key block Y' − A' and Z − a, per family its base terms,
            # then one product with the 0/1 rows of the chunk's distinct plans
            Yd = Y.addcmul_(Zt[..., None], dense[:, None], value=-1.0)  # Y' [h, nb, t, D]
            base_y = batched_mm(always, Yd.view(nh, nb, t * D)).view(nh, F, t, D) if has_text else 0.0
            rows, index = pl.rows(sel_cpu, ct)  # [h, n, R', K], [h, n, F·G]
            Rn = rows.shape[2]
            err = torch.empty(nh, n, Rn, PS, dtype=torch.float64, device=dev)
            for psi, p in enumerate(pseudo):
                U, V = terms[psi, :nh, :, :t], den_terms[psi, :nh, :, :t]
                a_sub = p.counts[hs][:, None, :] * torch.exp(batched_mm(qs, p.kbar[hs].transpose(1, 2)) - m[..., None])  # [h, t, n_sub]
                a = torch.cat([a_sub, a_sub.new_zeros(nh, t, 1)], -1)[:, :, p.slot].transpose(1, 2)  # [h, nb, t, b/s]
                torch.sub(Yd, batched_mm(a, p.vslot[hs]), out=U[:, :nb])  # Y − A − Z·o*
                a = a.sum(-1)  # [h, nb, t]
                U[:, :nb].addcmul_(a[..., None], dense[:, None])  # Y' − A'
                torch.addcmul(batched_mm(a_sub, cand_v[psi]).view(nh, t, F, D).transpose(1, 2), batched_mm(cand, a)[..., None], dense[:, None],
                              value=-1.0, out=U[:, nb:]).add_(base_y)
                torch.sub(Zt, a, out=V[:, :nb])
                V[:, nb:] = batched_mm(cand, a) + (batched_mm(always, Zt) if has_text else 0.0)
                # (into a buffer reused across chunks: fresh memory costs its first touch on the CPU)
                diff = batched_mm(rows, U.reshape(nh, K, n, M * D).transpose(1, 2), out=diffs[: nh * n * Rn * M * D].view(nh, n, Rn, M * D))
                num = diff.abs_().view(nh, n, Rn, M, D).sum(-1)  # |num − den·o*|₁ [h, n, R', M]
                den = batched_mm(rows, V.reshape(nh, K, n, M).transpose(1, 2))
                err[..., psi] = ((num / den).double() * w[:, None, :]).sum(-1)
            err = torch.gather(err, 2, index[..., None].expand(nh, n, R, PS))  # [h, n, F·G, PS]
            for kid in range(2):
                out["num"][hs, kid] += torch.where((kinds == kid)[:, None, None], err, 0.0).sum(1).view(nh, F, G, PS)
    return out
