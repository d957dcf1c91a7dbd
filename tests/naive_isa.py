"""An independent, loop-based restatement of ISA (ISA.md §2) used to cross-check the reference.

Written for clarity, not speed: Python loops over (batch, head, block). Small shapes only.
"""

from __future__ import annotations

import math

import torch


def naive_blocks(spans, b):
    out, pos = [], 0
    for kind, n in spans:
        for off in range(0, n, b):
            out.append((pos + off, min(b, n - off), kind))
        pos += n
    return out


def _ceil(alpha, n):
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(alpha * n - 1e-9)))


def _top(values, idx, count):
    """Indices (from idx) of the `count` largest values, ties broken by lower index."""
    order = sorted(idx, key=lambda j: (-values[j], j))
    return set(order[:count])


def naive_isa(q, k, v, spans, alpha_s, alpha_f, alpha_ns, b, sharpness="topk_mass", topk_fraction=0.0625):
    """q, k, v: [B, N, H, D] float64. Ratios may be per-head lists. Returns output [B, N, H, D]."""
    B, N, H, D = q.shape
    blocks = naive_blocks(spans, b)
    nb = len(blocks)
    kinds = [kd for _, _, kd in blocks]
    T = [j for j in range(nb) if kinds[j] == "target"]
    C = [j for j in range(nb) if kinds[j] == "context"]
    X = [j for j in range(nb) if kinds[j] == "text"]
    nonX = [j for j in range(nb) if kinds[j] != "text"]
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)

    def per_head(a, h):
        return a[h] if isinstance(a, (list, tuple)) else a

    for bi in range(B):
        for h in range(H):
            qs, ks, vs = q[bi, :, h], k[bi, :, h], v[bi, :, h]
            mean = lambda x, j: x[blocks[j][0] : blocks[j][0] + blocks[j][1]].mean(0)
            qbar = torch.stack([mean(qs, j) for j in range(nb)])
            kbar = torch.stack([mean(ks, j) for j in range(nb)])
            vbar = torch.stack([mean(vs, j) for j in range(nb)])
            L = qbar @ kbar.T * scale
            P = torch.softmax(L, dim=-1)
            sal = {j: float(sum(P[i, j] for i in T)) for j in C}
            kept_c = _top(sal, C, _ceil(per_head(alpha_s, h), len(C)))
            kv = sorted(set(T) | set(X) | kept_c)
            if sharpness == "topk_mass":
                kk = max(1, math.floor(topk_fraction * len(T) + 1e-9))
                sharp = {i: float(torch.sort(P[i, T], descending=True).values[:kk].sum()) for i in nonX}
            else:
                sharp = {i: float((P[i] ** 2).sum()) for i in nonX}
            exact_q = _top(sharp, nonX, _ceil(per_head(alpha_f, h), len(nonX))) | set(X)
            kv_nt = [j for j in kv if kinds[j] != "text"]
            n_ex = _ceil(per_head(alpha_ns, h), len(kv_nt))
            for i in range(nb):
                s0, n, _ = blocks[i]
                if i in exact_q:
                    ex, ap = kv, []
                else:
                    sel = _top({j: float(L[i, j]) for j in kv_nt}, kv_nt, n_ex) | set(X)
                    ex = sorted(sel)
                    ap = [j for j in kv if j not in sel]
                key_idx = torch.cat([torch.arange(blocks[j][0], blocks[j][0] + blocks[j][1]) for j in ex])
                qi = qs[s0 : s0 + n]
                logits = [qi @ ks[key_idx].T * scale]
                vals = [vs[key_idx]]
                if ap:
                    cnt = torch.tensor([float(blocks[j][1]) for j in ap], dtype=q.dtype)
                    logits.append(qi @ kbar[ap].T * scale + torch.log(cnt))
                    vals.append(vbar[ap])
                p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
                out[bi, s0 : s0 + n, h] = p @ torch.cat(vals)
    return out


def naive_pair_counts(plan, counts, pseudo_block):
    """(exact, pseudo-key) token pairs of ``plan`` counted block pair by block pair: ``counts`` the tokens of
    every block, a kept block that is not exact gives ceil(count / pseudo_block) pseudo-keys per query token."""
    B, H, nb = plan.kv_keep.shape
    mask = plan.exact_mask()
    exact = pseudo = 0
    for b in range(B):
        for h in range(H):
            for i in range(nb):
                for j in range(nb):
                    if mask[b, h, i, j]:
                        exact += counts[i] * counts[j]
                    elif plan.kv_keep[b, h, j]:
                        pseudo += counts[i] * len(range(0, counts[j], pseudo_block))
    return exact, pseudo
