"""Calibration measurement of the fixed mode: what ISA's ratios would cost in output error, against dense attention.

For one self-attention call (q, k, v [B, N, H, D] after norms and RoPE, and its :class:`Layout`),
:func:`measure_fixed_call` estimates, per head and separately for target-query and context-query outputs, the
relative L1 error of ISA against dense attention for every setting of a grid of
(sharpness metric, α_s, α_f, α_ns), without running ISA once per setting:

1. Plan once from pooled statistics (block means, pooled attention P, context saliency, sharpness of
   every query block, its rank) — cheap, O((N/b)²·D) per head.
2. Sample query blocks of each kind (default 48 per kind and head group) and a few tokens in each
   (default 16). For those rows only, compute the exact scores against every key, and per key block the
   softmax numerator Y[t, j] = Σ_{r∈j} e^{s_tr−m_t} v_r and denominator Z[t, j] (one batched matmul).
   Dense output = Σ_j Y / Σ_j Z.
3. Every ISA variant is then a 0/1 weighting of key blocks (exact, approximated by a block mean, or
   dropped): the exact branch depends on α_s only, the Taylor branch on (α_s, α_ns); their outputs for
   all variants come from one small batched matmul over the block axis. α_f and the sharpness metric do
   not need new outputs: a sampled block is exact iff its sharpness rank < ⌈α_f·Q⌉, so the error of
   every (metric, α_s, α_f, α_ns) is a mix of the per-block exact and Taylor errors.

The selections reproduce :meth:`FixedMode.plan <isa_plugin.selection.fixed.FixedMode.plan>` exactly (same counts,
same stable tie-breaking); the calibration tests check the estimate against the reference ISA with every
block sampled. Errors are ratio estimates: Σ|o−o*|₁ / Σ|o*|₁ over sampled tokens, each token weighted by
(block tokens / sampled tokens of its block).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Dict, Iterator, Optional

import torch

from ..kernels.counts import keep_count, topk_count
from ..kernels.reference import pool_blocks
from ..layout import CONTEXT, TARGET, TEXT, Layout
from .measure import Sampler, single_entry

__all__ = ["measure_fixed_call", "fixed_zero_stats"]


def fixed_zero_stats(heads: int, grid, device=None) -> Dict[str, torch.Tensor]:
    """The fixed mode's statistics of a grid (``grid.shape`` = (M, S, F, NS)), all zero."""
    M, S, F, NS = grid.shape
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    return {"num": z(heads, 2, M, S, F, NS), "den": z(heads, 2), "prune_num": z(heads, 2, S), "taylor_num": z(heads, 2, NS),
            "corr_sum": z(heads, 2, M, NS), "corr_n": z(heads, 2), "ctx_mass": z(heads)}


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """Let fp32 matmuls use TF32 (bf16/fp16 inputs are exact in TF32); restored on exit."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim (ties broken by position); NaN-free (0 when constant)."""
    def ranks(a):
        a = a.contiguous()
        r = torch.empty_like(a)
        r.scatter_(-1, torch.sort(a, dim=-1, stable=True).indices, torch.arange(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a))
        return r - r.mean(-1, keepdim=True)

    rx, ry = ranks(x), ranks(y)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp(min=1e-30), torch.zeros_like(den))


@torch.no_grad()
def measure_fixed_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    grid,
    *,
    block_size: int = 64,
    sampler: Optional[Sampler] = None,
    topk_fraction: float = 0.0625,
    scale: Optional[float] = None,
    max_chunk_elems: int = 1 << 28,
) -> Dict[str, torch.Tensor]:
    """The fixed mode's statistics of one attention call (one batch entry): see the module docstring.

    Args:
        q, k, v: [N, H, D] or [1, N, H, D] (one batch entry), any float dtype, on any device.
        layout: the call's :class:`Layout` (covers N tokens).
        grid: the candidate ratios (a :class:`~isa_plugin.selection.fixed.FixedGrid`).
        block_size, topk_fraction: as in the fixed mode's settings.
        sampler: query blocks sampled per kind (all when fewer exist), tokens per sampled block (all when
            the block is shorter) and the CPU generator (reproducible calibration).
        max_chunk_elems: bound on the transient [tokens, N] score buffers (elements).

    Returns:
        :func:`fixed_zero_stats`' tensors for this call, on the inputs' device: ``num`` [H, 2, M, S, F, NS]
        (Σ|o_ISA − o_dense|₁ per head, query kind, metric, α_s, α_f, α_ns), ``den`` [H, 2], ``prune_num``
        [H, 2, S] (context pruning alone), ``taylor_num`` [H, 2, NS] (the Taylor branch for every query at
        α_s = 1), ``corr_sum`` [H, 2, M, NS] and ``corr_n`` [H, 2] (Spearman correlation of sharpness and
        Taylor error), ``ctx_mass`` [H] (pooled mass target queries put on context blocks).
    """
    sampler = sampler or Sampler()
    blocks_per_kind, tokens_per_block, generator = sampler.blocks_per_kind, sampler.tokens_per_block, sampler.generator
    q, k, v, ct, sc = single_entry(q, k, v, layout, scale, "measure_call")
    N, H, D = q.shape
    dev = q.device
    M, S, F, NS = grid.shape
    out = SimpleNamespace(**fixed_zero_stats(H, grid, device=dev))

    blocks_cpu = layout.blocks(block_size)
    kinds_cpu = blocks_cpu.kinds
    nb = blocks_cpu.num_blocks
    n_t, n_c, n_x = (int((kinds_cpu == kk).sum()) for kk in (TARGET, CONTEXT, TEXT))
    n_q = n_t + n_c  # non-text query blocks
    if nb < 2 or n_q == 0:
        return vars(out)
    blocks = blocks_cpu.to(dev)
    is_t, is_c, is_x = (blocks.kinds == TARGET), (blocks.kinds == CONTEXT), (blocks.kinds == TEXT)
    counts = blocks.counts.to(ct)

    with _tf32():
        # ---------------------------------------------------------------- pooled planning (all heads)
        qbar = pool_blocks(q[None], blocks)[0]  # [H, nb, D]
        kbar = pool_blocks(k[None], blocks)[0]
        vbar = pool_blocks(v[None], blocks)[0]
        logits = torch.matmul(qbar, kbar.transpose(-1, -2)) * sc  # [H, nb, nb]
        P = torch.softmax(logits, dim=-1)
        saliency = (P * is_t[None, :, None]).sum(dim=1) * is_c  # [H, nb]
        if n_c:
            out.ctx_mass += (P[:, is_t][:, :, is_c].sum(-1)).mean(-1).to(torch.float64)
        # kept context blocks per alpha_s: [S, H, nb]
        if n_c:
            sal = saliency.masked_fill(~is_c, float("-inf"))
            order = torch.sort(sal, dim=-1, descending=True, stable=True).indices
            rank_c = torch.empty_like(order)
            rank_c.scatter_(-1, order, torch.arange(nb, device=dev).expand_as(order))
            kept_n = [keep_count(a, n_c) for a in grid.alpha_s]
            keep = torch.stack([(rank_c < kn) & is_c for kn in kept_n])  # [S, H, nb]
        else:
            kept_n = [0] * S
            keep = torch.zeros(S, H, nb, dtype=torch.bool, device=dev)
        kv_keep = keep | ~is_c  # [S, H, nb]

        # sharpness per metric and the rank of every non-text query block: [M, H, nb]
        ranks = []
        sharps = []
        kt = topk_count(topk_fraction, n_t)
        for m in grid.metrics:
            if m == "topk_mass":
                sh = P[..., is_t].topk(min(kt, n_t), dim=-1).values.sum(-1) if n_t else torch.zeros(H, nb, device=dev, dtype=P.dtype)
            else:
                sh = (P * P).sum(-1)
            sharps.append(sh)
            s_masked = sh.masked_fill(is_x, float("-inf"))
            o = torch.sort(s_masked, dim=-1, descending=True, stable=True).indices
            r = torch.empty_like(o)
            r.scatter_(-1, o, torch.arange(nb, device=dev).expand_as(o))
            ranks.append(r)
        rank = torch.stack(ranks)  # [M, H, nb]
        sharp = torch.stack(sharps)
        n_exact_f = torch.tensor([keep_count(a, n_q) for a in grid.alpha_f], device=dev)  # [F]

        # ---------------------------------------------------------------- sampling (CPU generator)
        sel, sel_kind = [], []
        for kind_id, kk in ((0, TARGET), (1, CONTEXT)):
            cand = torch.nonzero(kinds_cpu == kk).flatten()
            if cand.numel() == 0:
                continue
            pick = cand[torch.randperm(cand.numel(), generator=generator)[: min(blocks_per_kind, cand.numel())]]
            sel.append(pick)
            sel_kind.append(torch.full((pick.numel(),), kind_id, dtype=torch.int64))
        sel_cpu = torch.cat(sel)
        kind_cpu = torch.cat(sel_kind)
        n_sel = sel_cpu.numel()
        m_tok = min(tokens_per_block, block_size)
        bcounts = blocks_cpu.counts[sel_cpu]  # [s]
        # a random permutation of each block's valid offsets (invalid offsets sort last), first m_tok taken
        keys = torch.rand(n_sel, block_size, generator=generator) + (torch.arange(block_size)[None, :] >= bcounts[:, None]) * 2.0
        offs = torch.argsort(keys, dim=-1)[:, :m_tok]
        tok_valid = torch.arange(m_tok)[None, :] < bcounts[:, None]
        offs = torch.where(tok_valid, offs, torch.zeros_like(offs))
        n_used = tok_valid.sum(-1).clamp(min=1)
        tok_w = (bcounts.to(torch.float64) / n_used)[:, None] * tok_valid  # [s, m]
        tok_idx = blocks_cpu.starts[sel_cpu][:, None] + offs  # [s, m]
        sel_d = sel_cpu.to(dev)
        kind_d = kind_cpu.to(dev)
        tok_idx_d = tok_idx.to(dev)
        tok_w_d = tok_w.to(dev)

        # key padding: [nb, b] token indices, invalid slots masked
        ar_b = torch.arange(block_size, device=dev)
        key_idx = blocks.starts[:, None] + ar_b[None, :]
        key_valid = ar_b[None, :] < blocks.counts[:, None]
        key_idx = torch.where(key_valid, key_idx, torch.zeros_like(key_idx))
        key_bias = torch.zeros(nb, block_size, dtype=ct, device=dev).masked_fill(~key_valid, float("-inf"))

        # Taylor candidates: non-text KV' blocks, per alpha_s; counts per (alpha_s, alpha_ns)
        cand = kv_keep & ~is_x  # [S, H, nb]
        k_prime = [n_t + kept_n[si] for si in range(S)]
        n_exact_ns = [[keep_count(a, k_prime[si]) for a in grid.alpha_ns] for si in range(S)]

        # per-sample errors for every head: exact branch [H, s, S] and Taylor branch [H, s, S, NS]
        err_exact = torch.zeros(H, n_sel, S, dtype=torch.float64, device=dev)
        err_taylor = torch.zeros(H, n_sel, S, NS, dtype=torch.float64, device=dev)
        ref_norm = torch.zeros(H, n_sel, dtype=torch.float64, device=dev)
        n_var = S * (1 + NS)
        per_block = max(1, m_tok * nb * max(block_size, D))  # transient elements per sampled block and head
        # heads in groups (fewer launches per call), sampled blocks in chunks: both bounded by max_chunk_elems
        hc = max(1, min(H, max_chunk_elems // (per_block * n_sel)))
        chunk = max(1, min(n_sel, max_chunk_elems // (per_block * hc)))

        # exact / approximated key blocks of every variant, all heads at once: [H, s, V, nb]
        # variants: S exact-branch ones (every KV' block exact), then S·NS Taylor ones (alpha_s-major)
        lg = logits[:, sel_d]  # [H, s, nb] pooled logits of the sampled query blocks
        order = torch.sort(lg, dim=-1, descending=True, stable=True).indices
        c_sorted = torch.gather(cand[:, :, None, :].expand(S, H, n_sel, nb), -1, order[None].expand(S, H, n_sel, nb))
        cum = torch.cumsum(c_sorted.to(torch.int32), dim=-1)  # [S, H, s, nb]
        thr = torch.tensor(n_exact_ns, device=dev, dtype=torch.int32)  # [S, NS]
        pick_sorted = c_sorted[:, :, :, None, :] & (cum[:, :, :, None, :] <= thr[:, None, None, :, None])  # [S, H, s, NS, nb]
        pick = torch.zeros_like(pick_sorted).scatter_(-1, order[None, :, :, None, :].expand_as(pick_sorted), pick_sorted)
        ex = pick | is_x
        ap = kv_keep[:, :, None, None, :] & ~ex
        w_ex_all = torch.cat([kv_keep[:, :, None, :].expand(S, H, n_sel, nb).permute(1, 2, 0, 3),
                              ex.permute(1, 2, 0, 3, 4).reshape(H, n_sel, S * NS, nb)], dim=2).to(ct)
        w_ap_all = torch.cat([torch.zeros(H, n_sel, S, nb, dtype=torch.bool, device=dev),
                              ap.permute(1, 2, 0, 3, 4).reshape(H, n_sel, S * NS, nb)], dim=2).to(ct)
        del pick_sorted, pick, ex, ap, c_sorted, cum

        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            g = h1 - h0
            kp = k[:, h0:h1][key_idx].permute(2, 0, 1, 3).to(ct)  # [g, nb, b, D]
            vp = v[:, h0:h1][key_idx].permute(2, 0, 1, 3).to(ct)
            kb, vb = kbar[h0:h1], vbar[h0:h1]  # [g, nb, D]
            wex_g, wap_g = w_ex_all[h0:h1], w_ap_all[h0:h1]  # [g, s, V, nb]
            for c0 in range(0, n_sel, chunk):
                c1 = min(n_sel, c0 + chunk)
                cs = c1 - c0
                T = cs * m_tok
                qs = q[tok_idx_d[c0:c1].flatten(), h0:h1].transpose(0, 1).to(ct) * sc  # [g, T, D], scale folded in
                s_tok = torch.matmul(qs, kp.reshape(g, nb * block_size, D).transpose(-1, -2)).view(g, T, nb, block_size)
                s_tok.add_(key_bias)
                mx = s_tok.amax(dim=(2, 3), keepdim=True)  # [g, T, 1, 1]
                e = s_tok.sub_(mx).exp_()  # in place: the score buffer becomes the softmax numerators
                Z = e.sum(-1)  # [g, T, nb]
                Y = torch.matmul(e.transpose(1, 2), vp)  # [g, nb, T, D]
                del e, s_tok
                o_dense = (Y.sum(1) / Z.sum(-1, keepdim=True)).view(g, cs, m_tok, D)
                Yc = Y.view(g, nb, cs, m_tok * D).transpose(1, 2)  # [g, cs, nb, m*D] (strided view, no copy)
                # approximated blocks: a[t, j] = n_j e^{q_t·k̄_j·sc − m_t}
                a = counts * torch.exp(torch.matmul(qs, kb.transpose(-1, -2)) - mx[..., 0])  # [g, T, nb]
                a = a.view(g, cs, m_tok, nb)
                Zc = Z.view(g, cs, m_tok, nb)
                wex, wap = wex_g[:, c0:c1], wap_g[:, c0:c1]  # [g, cs, V, nb]
                num = torch.matmul(wex, Yc).view(g, cs, n_var, m_tok, D)
                num = num + torch.einsum("gsvj,gsmj,gjd->gsvmd", wap, a, vb)
                den = torch.einsum("gsvj,gsmj->gsvm", wex, Zc) + torch.einsum("gsvj,gsmj->gsvm", wap, a)
                o = num / den[..., None]
                err = (o - o_dense[:, :, None]).abs().sum(-1).to(torch.float64)  # [g, cs, V, m]
                w = tok_w_d[c0:c1]  # [cs, m]
                err = (err * w[None, :, None, :]).sum(-1)  # [g, cs, V]
                ref_norm[h0:h1, c0:c1] = (o_dense.abs().sum(-1).to(torch.float64) * w).sum(-1)
                err_exact[h0:h1, c0:c1] = err[..., :S]
                err_taylor[h0:h1, c0:c1] = err[..., S:].reshape(g, cs, S, NS)
                del Y, Yc, num, o

        # ---------------------------------------------------------------- mix over alpha_f and accumulate
        r_sel = rank[:, :, sel_d]  # [M, H, s]
        exact_f = r_sel[:, :, None, :] < n_exact_f[None, None, :, None]  # [M, H, F, s]
        for kind_id in range(2):
            mk = kind_d == kind_id
            if not bool(mk.any()):
                continue
            ee = err_exact[:, mk]  # [H, s_k, S]
            et = err_taylor[:, mk]  # [H, s_k, S, NS]
            ef = exact_f[:, :, :, mk]  # [M, H, F, s_k]
            # mixed[m, h, f, s_k, S, NS]
            mixed = torch.where(ef[..., None, None], ee[None, :, None, :, :, None], et[None, :, None])
            out.num[:, kind_id] += mixed.sum(3).permute(1, 0, 3, 2, 4)  # -> [H, M, S, F, NS]
            out.den[:, kind_id] += ref_norm[:, mk].sum(-1)
            out.prune_num[:, kind_id] += ee.sum(1)
            out.taylor_num[:, kind_id] += et[:, :, -1].sum(1)
            if int(mk.sum()) >= 3:
                rel = et[:, :, -1, :] / ref_norm[:, mk, None].clamp(min=1e-30)  # [H, s_k, NS]
                sh = sharp[:, :, sel_d[mk]].to(torch.float64)  # [M, H, s_k]
                corr = _spearman(sh[:, :, None, :].expand(M, H, NS, -1), rel.permute(0, 2, 1)[None].expand(M, H, NS, -1))
                out.corr_sum[:, kind_id] += corr.permute(1, 0, 2)
                out.corr_n[:, kind_id] += 1
    return vars(out)
