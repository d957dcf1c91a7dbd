"""Calibration statistics of ISA's adaptive mode (``docs/ADAPTIVE.md``) for one attention call.

For every grid setting (α_s, mass p, pseudo-key size s) and head, :func:`measure_adaptive_call` estimates the
relative L1 error of the adaptive mode against dense attention, separately for target-query and
context-query outputs, and counts the exact and pseudo pairs the mode's plan would compute. As in
:func:`~isa_plugin.calibration.measure.measure_call`: the plan is computed for real (the adaptive planner on the
block means, all query blocks), the outputs only on sampled tokens of sampled query blocks, each token
weighted by (block tokens / sampled tokens of its block). For a sampled token t the exact scores against all
keys give, per key block j, Y[t, j] = Σ_{r∈j} e^{s_tr−m_t} v_r and Z[t, j]; per pseudo-key σ of size c_σ,
A[t, σ] = c_σ e^{q_t·k̄_σ·scale−m_t}. Every setting's output is then (Σ_exact Y + Σ_pseudo A v̄) /
(Σ_exact Z + Σ_pseudo A): one score pass serves the whole grid.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from ..config import AdaptiveSettings
from ..kernels.adaptive_reference import plan_adaptive_from_pooled, sub_blocks
from ..kernels.reference import plan_pair_counts, pool_blocks
from ..layout import CONTEXT, TARGET, Layout

__all__ = ["measure_adaptive_call"]



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

def _sample_tokens(blocks_cpu, block_size: int, blocks_per_kind: int, tokens_per_block: int, generator):
    """Sampled query tokens [T], their weights [T] (float64) and kinds [T] (0 target, 1 context)."""
    toks, wts, kinds = [], [], []
    for kind_id, kk in ((0, TARGET), (1, CONTEXT)):
        cand = torch.nonzero(blocks_cpu.kinds == kk).flatten()
        if cand.numel() == 0:
            continue
        pick = cand[torch.randperm(cand.numel(), generator=generator)[: min(blocks_per_kind, cand.numel())]]
        for blk in pick.tolist():
            n = int(blocks_cpu.counts[blk])
            m = min(tokens_per_block, n)
            offs = torch.randperm(n, generator=generator)[:m]
            toks.append(int(blocks_cpu.starts[blk]) + offs)
            wts.append(torch.full((m,), n / m, dtype=torch.float64))
            kinds.append(torch.full((m,), kind_id, dtype=torch.int64))
    return torch.cat(toks), torch.cat(wts), torch.cat(kinds)


@torch.no_grad()
def measure_adaptive_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    alpha_s: Sequence[float],
    mass: Sequence[float],
    pseudo_block: Sequence[int],
    *,
    block_size: int = 64,
    blocks_per_kind: int = 48,
    tokens_per_block: int = 16,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    max_chunk_elems: int = 1 << 26,
) -> Dict[str, torch.Tensor]:
    """Adaptive-mode errors and pair counts of one attention call (one batch entry) over a grid.

    Args:
        q, k, v: [N, H, D] or [1, N, H, D], any float dtype, on any device.
        layout: the call's :class:`Layout`.
        alpha_s, mass, pseudo_block: the grid (S, P and PS values); each pseudo size must divide ``block_size``.
        block_size, blocks_per_kind, tokens_per_block, generator: as in ``measure_call``.
        max_chunk_elems: bound on the transient [tokens, N] buffers.

    Returns:
        ``{"num": [H, 2, S, P, PS], "den": [H, 2], "pairs": [H, S, P, PS, 2, 2]}`` float64 on the inputs'
        device: Σ|o − o*|₁ and Σ|o*|₁ over sampled tokens per query kind (target, context), and the (exact,
        pseudo) pairs of the plan's rows of non-context (target and text) and of context query blocks — a
        query block's selection depends only on its own threshold, so any (mass, context_mass) pair is a
        sum of two entries.

    Raises:
        ValueError: a pseudo size that does not divide ``block_size`` (through :class:`AdaptiveSettings`).

    Example:
        >>> r = measure_adaptive_call(q, k, v, layout, alpha_s=[0.5, 1.0], mass=[0.8, 0.95], pseudo_block=[16, 64])
    """
    q, k, v, ct, sc = single_entry(q, k, v, layout, scale, "measure_adaptive_call")
    N, H, D = q.shape
    dev = q.device
    S, P, PS = len(alpha_s), len(mass), len(pseudo_block)
    out = {"num": torch.zeros(H, 2, S, P, PS, dtype=torch.float64, device=dev),
           "den": torch.zeros(H, 2, dtype=torch.float64, device=dev),
           "pairs": torch.zeros(H, S, P, PS, 2, 2, dtype=torch.float64, device=dev)}
    blocks_cpu = layout.blocks(block_size)
    nb = blocks_cpu.num_blocks
    if nb < 2 or not bool(((blocks_cpu.kinds == TARGET) | (blocks_cpu.kinds == CONTEXT)).any()):
        return out
    blocks = blocks_cpu.to(dev)
    qbar = pool_blocks(q[None], blocks)  # [1, H, nb, D]
    kbar = pool_blocks(k[None], blocks)

    # plans of every (alpha_s, mass): the selections do not depend on the pseudo-key size
    plans = {}
    for si, a_s in enumerate(alpha_s):
        for pi, p in enumerate(mass):
            st = AdaptiveSettings(mass=p, alpha_s=a_s, block_size=block_size)
            plan = plan_adaptive_from_pooled(qbar, kbar, blocks, st, sc)
            plans[si, pi] = (plan.kv_keep[0], plan.exact_kv[0])  # [H, nb], [H, nb, nb]
            is_c = blocks.kinds == CONTEXT
            for psi, ps in enumerate(pseudo_block):
                AdaptiveSettings(block_size=block_size, pseudo_block=ps)  # validates ps
                for kid, rows in enumerate((~is_c, is_c)):
                    e, a = plan_pair_counts(blocks, plan.kv_keep, plan.exact_kv, ps, per_head=True, query_blocks=rows)
                    out["pairs"][:, si, pi, psi, kid, 0] = e
                    out["pairs"][:, si, pi, psi, kid, 1] = a

    tok, w, kind = _sample_tokens(blocks_cpu, block_size, blocks_per_kind, tokens_per_block, generator)
    tok, w, kind = tok.to(dev), w.to(dev), kind.to(dev)
    qb = blocks.token_block[tok]  # [T]
    T = tok.numel()
    ar = torch.arange(block_size, device=dev)
    key_idx = blocks.starts[:, None] + ar[None, :]
    key_valid = ar[None, :] < blocks.counts[:, None]
    key_idx = torch.where(key_valid, key_idx, torch.zeros_like(key_idx))
    subs = [sub_blocks(blocks_cpu, ps) for ps in pseudo_block]
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
            s = (qs @ kp.reshape(nb * block_size, D).T).view(c1 - c0, nb, block_size)
            s = s.masked_fill(~key_valid, float("-inf"))
            m = s.amax(dim=(1, 2))  # [t]
            e = torch.exp(s - m[:, None, None])
            Z = e.sum(-1)  # [t, nb]
            Y = torch.einsum("tjb,jbd->tjd", e, vp)  # [t, nb, D]
            del e, s
            dense = Y.sum(1) / Z.sum(1, keepdim=True)
            ww, kd = w[c0:c1], kind[c0:c1]
            ref = dense.abs().sum(-1).double() * ww
            for kid in range(2):
                out["den"][h, kid] += ref[kd == kid].sum()
            A = [(cnt * torch.exp(qs @ kb.T - m[:, None]), vb, parent) for kb, vb, cnt, parent in pseudo]
            qbc = qb[c0:c1]
            for (si, pi), (keep, exact) in plans.items():
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
                        out["num"][h, kid, si, pi, psi] += err[kd == kid].sum()
    return out
