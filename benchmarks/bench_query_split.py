"""Lever study of the adaptive mode: query-side adaptivity (query sub-blocks that select their own exact key blocks).

For each synthetic workload (:data:`~isa_plugin.calibration.synthetic.WORKLOADS`; default 8 frames of 16 × 16
tokens per video, N = 4,096, 4 heads, D = 64, 3 layers, b = 64; CPU, float64), on held-out samples 100 and 101,
every call is planned at masses 0.5 … 0.98 with the adaptive mode's rule (docs/ADAPTIVE.md, α_s = 1, one
block-mean pseudo-key per key block, min_blocks = 1): per query group, the fewest key blocks, by descending pooled
mass n_j·exp(q̄·k̄_j·scale), whose mass reaches p are exact. The query groups differ by variant:

- ``block``: one group per query block (what the mode does; checked against the mode's own planner);
- ``split2``: each query block's two halves (sub-blocks of ⌈n/2⌉ and ⌊n/2⌋ rows) select for themselves, with the
  means of their own rows;
- ``split2-disagree``: the halves select for themselves only where their two selections disagree (Jaccard
  similarity below 0.5); elsewhere the block's selection serves both.

Cost = (exact + pseudo-key pairs) / N² (the extra pooling of sub-block means is not counted); error = relative L1
of all target-query and all context-query outputs against dense attention. Printed: per variant, the cost of the
cheapest mass whose worst layer error (max of target and context) is within the budget, and the full table.

Usage: ``python benchmarks/bench_query_split.py [--threads 2] [--json out.json]`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from workload_study import VariantErrors, lever_study_main, mass_rows, workload_model  # noqa: E402
from isa_plugin import ISAConfig  # noqa: E402
from isa_plugin.executors.reference import plan_reference  # noqa: E402

VARIANTS = ("block", "split2", "split2-disagree")
MASSES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def select(qbar, kbar, log_n, mass, scale):
    """[G, nb] bool: per query group (mean qbar [G, D]), the fewest key blocks holding ``mass`` of its pooled mass
    (count bias log_n; descending order, ties to the lower block id; at least one)."""
    m = torch.softmax(qbar @ kbar.T * scale + log_n[None, :], -1)  # [G, nb]
    order = torch.sort(m, dim=-1, descending=True, stable=True).indices
    ms = torch.gather(m, -1, order)
    prefix = torch.cumsum(ms, -1)
    before = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], -1)  # S_k: the mass of the k largest
    k_star = (before < mass).sum(-1).clamp(min=1)  # [G]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m.shape[-1]).expand_as(order))
    return rank < k_star[:, None]


def halves(blocks):
    """[N] 0 / 1: the half of its query block each token lies in."""
    tb = blocks.token_block
    pos = torch.arange(tb.numel()) - blocks.starts[tb]
    return (pos >= (blocks.counts[tb] + 1) // 2).long()


def exact_rows(q, k, blocks, mass, scale, variant):
    """[N, nb] bool: the exact key blocks of every query token under ``variant`` (one head: q, k [N, D])."""
    tb, nb = blocks.token_block, blocks.num_blocks
    log_n = torch.log(blocks.counts.double())
    cnt = blocks.counts.double()[:, None]
    kbar = torch.zeros(nb, k.shape[1], dtype=k.dtype).index_add_(0, tb, k) / cnt
    qbar = torch.zeros(nb, q.shape[1], dtype=q.dtype).index_add_(0, tb, q) / cnt
    sel_block = select(qbar, kbar, log_n, mass, scale)  # [nb, nb]
    if variant == "block":
        return sel_block[tb]
    half = halves(blocks)
    g = tb * 2 + half  # query group of every token
    n_g = torch.zeros(2 * nb, dtype=q.dtype).index_add_(0, g, torch.ones_like(g, dtype=q.dtype))
    qg = torch.zeros(2 * nb, q.shape[1], dtype=q.dtype).index_add_(0, g, q) / n_g.clamp(min=1)[:, None]
    sel_g = select(qg, kbar, log_n, mass, scale).view(nb, 2, nb)
    sel_g = torch.where((n_g.view(nb, 2) > 0)[..., None], sel_g, sel_block[:, None, :])  # 1-token blocks: one half
    if variant == "split2-disagree":
        inter = (sel_g[:, 0] & sel_g[:, 1]).sum(-1).double()
        union = (sel_g[:, 0] | sel_g[:, 1]).sum(-1).double()
        agree = inter / union.clamp(min=1) >= 0.5
        sel_g = torch.where(agree[:, None, None], sel_block[:, None, :], sel_g)
    return sel_g.reshape(2 * nb, nb)[g]


def execute(q, k, v, blocks, exact, scale):
    """Output [N, D] (one head): exact keys of each row's exact blocks plus one block-mean pseudo-key (bias log n)
    per other key block, one softmax."""
    tb, nb = blocks.token_block, blocks.num_blocks
    cnt = blocks.counts.double()[:, None]
    kbar = torch.zeros(nb, k.shape[1], dtype=k.dtype).index_add_(0, tb, k) / cnt
    vbar = torch.zeros(nb, v.shape[1], dtype=v.dtype).index_add_(0, tb, v) / cnt
    s_ex = (q @ k.T * scale).masked_fill(~exact[:, tb], float("-inf"))
    s_ps = (q @ kbar.T * scale + torch.log(cnt.T)).masked_fill(exact, float("-inf"))
    p = torch.softmax(torch.cat([s_ex, s_ps], 1), 1)
    return p[:, : q.shape[0]] @ v + p[:, q.shape[0]:] @ vbar


def run(workload, a):
    model = workload_model(workload, a)
    spec = model.spec
    rows = []
    checked = False
    for mass in MASSES:
        acc = {var: VariantErrors(spec.layers) for var in VARIANTS}
        for layer in range(spec.layers):
            for s in a.held_out:
                q, k, v, layout = model.sample(layer, s, dtype=torch.float64)
                blocks = layout.blocks(a.block_size)
                N, H, D = q.shape[1:]
                sc = D ** -0.5
                kinds = blocks.kinds[blocks.token_block]
                if not checked:  # the study's block rule is the mode's (text-free layouts, α_s = 1)
                    plan = plan_reference(q, k, layout, ISAConfig("adaptive", mass=mass, alpha_s=1.0, block_size=a.block_size))
                    mine = torch.stack([exact_rows(q[0, :, h], k[0, :, h], blocks, mass, sc, "block")[blocks.starts] for h in range(H)])
                    assert torch.equal(mine, plan.exact_mask()[0]), "the study's block selection differs from the mode's"
                    checked = True
                for var in VARIANTS:
                    pairs = 0.0
                    for h in range(H):
                        qh, kh, vh = q[0, :, h], k[0, :, h], v[0, :, h]
                        ex = exact_rows(qh, kh, blocks, mass, sc, var)  # [N, nb]
                        o = execute(qh, kh, vh, blocks, ex, sc)
                        dense = torch.softmax(qh @ kh.T * sc, -1) @ vh
                        pairs += float((ex.double() @ blocks.counts.double()).sum() + (~ex).sum())
                        acc[var].add(layer, o, dense, kinds)
                    acc[var].costs.append(pairs / (N * N * H))
        rows += mass_rows(acc, workload, mass)
    return rows


def main(argv=None):
    return lever_study_main(__doc__.split("\n")[0], run, VARIANTS, argv)


if __name__ == "__main__":
    sys.exit(main())
