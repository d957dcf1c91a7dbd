"""Calibration measurement of ordered-prefix plans: every threshold of a fine grid from one pass.

An *ordered-prefix family* of plans of one call fixes, per head, the kept key blocks (KV'), the key blocks every
query block computes exactly (``always``: the kept text blocks) and, per query block i, an order of the other
kept key blocks (the candidates); the family's plan number g makes the first ``counts[i, g]`` candidates of
query block i exact and every other kept block pseudo-keys. The adaptive mode's plans for every mass of a grid
are such a family (its order is the pooled mass, descending; the mass only sets the count).

Along the order the output of a sampled query token t is a running sum: with Y[t, j], Z[t, j] the exact
softmax numerator and denominator of key block j (as in :mod:`.measure`) and A[t, j], a[t, j] those of block
j's pseudo-keys, the output with the first n candidates exact is

    o_t(n) = (Y_always + A_cand + Σ_{r<n} (Y − A)[t, order_r]) / (Z_always + a_cand + Σ_{r<n} (Z − a)[t, order_r]),

so one cumulative sum over the candidates gives the error for *every* count n, and the error at each plan
of the family is a lookup. The cost of a measurement no longer grows with the number of thresholds: a grid
of 48 masses costs what one plan costs with the plan-by-plan measurement, and pair counts come from cumulative
token counts along the same order. Sampling, weights and the dense reference are those of :mod:`.measure`
(the same sampled tokens for the same sampler state), so both measurements agree to rounding on the same
plans (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch

from ..kernels.reference import pool_blocks
from ..layout import CONTEXT
from .measure import SampledCall, sample_tokens

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


def _padded_pseudo(blocks_cpu, s: int, dev):
    """Sub-blocks of ``s`` tokens laid out per block: ([nb, b/s] sub-block index, with n_sub for an empty slot), sub layout."""
    sub, parent = blocks_cpu.split(s)
    n_sub = int(parent.numel())
    per = -(-blocks_cpu.block_size // s)
    first = torch.cumsum(torch.bincount(parent, minlength=blocks_cpu.num_blocks), 0) - torch.bincount(parent, minlength=blocks_cpu.num_blocks)
    slot = torch.arange(n_sub) - first[parent]
    idx = torch.full((blocks_cpu.num_blocks, per), n_sub, dtype=torch.int64)
    idx[parent, slot] = torch.arange(n_sub)
    return idx.to(dev), sub.to(dev)


def _pairs(call: SampledCall, fam: OrderedFamily, pseudo_block: Sequence[int]) -> torch.Tensor:
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


@torch.no_grad()
def measure_ordered(call: SampledCall, families: Sequence[OrderedFamily], pseudo_block: Sequence[int],
                    max_chunk_elems: int = 1 << 26) -> Dict[str, torch.Tensor]:
    """Errors and pair counts of every plan of several ordered-prefix families of one call.

    Args:
        call: from :func:`~isa_plugin.selection.measure.sampled_call`.
        families: F families (e.g. one per α_s) with the same number G of plans.
        pseudo_block: the pseudo-key sizes (each divides the block size).
        max_chunk_elems: bound on the transient [tokens, N] and [tokens, nb, D] buffers.

    Returns:
        ``{"num": [H, 2, F, G, PS], "den": [H, 2], "pairs": [H, F, G, PS, 2, 2]}`` float64, as
        :func:`~isa_plugin.selection.measure.measure_plans` (Σ|o − o*|₁ and Σ|o*|₁ over sampled tokens per
        query kind; exact and pseudo pairs of the rows of non-context and of context query blocks).
    """
    q, k, v, ct, sc = call.q, call.k, call.v, call.ct, call.scale
    N, H, D = q.shape
    dev = q.device
    F, PS = len(families), len(pseudo_block)
    G = families[0].counts.shape[-1]
    b = call.block_size
    blocks, blocks_cpu = call.blocks, call.blocks_cpu
    nb = blocks.num_blocks
    out = {"num": torch.zeros(H, 2, F, G, PS, dtype=torch.float64, device=dev),
           "den": torch.zeros(H, 2, dtype=torch.float64, device=dev),
           "pairs": torch.stack([_pairs(call, f, pseudo_block) for f in families], 1)}

    tok, w, kind = (x.to(dev) for x in sample_tokens(blocks_cpu, call.sampler))
    qb = blocks.token_block[tok]
    T = tok.numel()
    ar = torch.arange(b, device=dev)
    key_valid = ar[None, :] < blocks.counts[:, None]
    key_idx = torch.where(key_valid, blocks.starts[:, None] + ar[None, :], torch.zeros((), dtype=torch.int64, device=dev))
    subs = [_padded_pseudo(blocks_cpu, s, dev) for s in pseudo_block]
    chunk = max(1, max_chunk_elems // max(1, N + 4 * nb * D))
    for h in range(H):
        kh, vh = k[:, h].to(ct), v[:, h].to(ct)
        kp, vp = kh[key_idx] * key_valid[..., None], vh[key_idx] * key_valid[..., None]  # [nb, b, D]
        pseudo = []
        for idx, sub in subs:
            kb = pool_blocks(k[None, :, h : h + 1], sub)[0, 0].to(ct)  # [n_sub, D]
            vb = torch.cat([pool_blocks(v[None, :, h : h + 1], sub)[0, 0].to(ct), torch.zeros(1, D, dtype=ct, device=dev)])
            pseudo.append((kb, vb[idx], sub.counts.to(ct), idx))  # vb per block slot: [nb, b/s, D]
        fam_h = [(f.keep[h].to(ct), f.always[h].to(ct), int((f.keep[h] & ~f.always[h]).sum()), f.order[h], f.counts[h])
                 for f in families]
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            t = c1 - c0
            qs = q[tok[c0:c1], h].to(ct) * sc  # [t, D]
            s = (qs @ kp.reshape(nb * b, D).T).view(t, nb, b).masked_fill(~key_valid, float("-inf"))
            m = s.amax(dim=(1, 2))  # [t]
            e = torch.exp(s - m[:, None, None])
            Z = e.sum(-1)  # [t, nb]
            Y = torch.einsum("tjb,jbd->tjd", e, vp)  # [t, nb, D]
            del e, s
            dense = Y.sum(1) / Z.sum(1, keepdim=True)
            ww, kd, qbc = w[c0:c1], kind[c0:c1], qb[c0:c1]
            ref = dense.abs().sum(-1).double() * ww
            for kid in range(2):
                out["den"][h, kid] += ref[kd == kid].sum()
            for psi, (kb, vb_pad, cnt, idx) in enumerate(pseudo):
                a = torch.cat([cnt * torch.exp(qs @ kb.T - m[:, None]), torch.zeros(t, 1, dtype=ct, device=dev)], 1)[:, idx]
                A = torch.einsum("tjs,jsd->tjd", a, vb_pad)  # [t, nb, D] pseudo-key numerators per block
                a = a.sum(-1)  # [t, nb]
                dY, dZ = Y - A, Z - a
                for fi, (keep, always, n_cand, order, counts) in enumerate(fam_h):
                    cand = keep - always
                    num0 = torch.einsum("tjd,j->td", Y, always) + torch.einsum("tjd,j->td", A, cand)
                    den0 = Z @ always + a @ cand
                    n = counts[qbc]  # [t, G]
                    num, den = num0[:, None].expand(t, G, D), den0[:, None].expand(t, G)
                    if n_cand:
                        o_idx = order[qbc, :n_cand]  # [t, K']
                        run = torch.gather(dY, 1, o_idx[..., None].expand(t, n_cand, D))
                        run = torch.cumsum(run, 1, out=run)  # [t, K', D]: sums over the first r + 1 candidates
                        pos = (n - 1).clamp(min=0)
                        some = (n > 0).to(ct)
                        num = num + torch.gather(run, 1, pos[..., None].expand(t, G, D)) * some[..., None]
                        den = den + torch.gather(torch.cumsum(torch.gather(dZ, 1, o_idx), 1), 1, pos) * some
                    err = (num / den[..., None] - dense[:, None]).abs().sum(-1).double() * ww[:, None]  # [t, G]
                    for kid in range(2):
                        out["num"][h, kid, fi, :, psi] += err[kd == kid].sum(0)
    return out
