"""Lever study of the adaptive mode: better pseudo-keys for the key blocks a query block does not compute exactly.

For each synthetic workload (:data:`~isa_plugin.calibration.synthetic.WORKLOADS`; default 8 frames of 16 × 16
tokens per video, N = 4,096, 4 heads, D = 64, 3 layers, b = 64; CPU, float64), on held-out samples 100 and 101,
the adaptive mode plans every call at masses 0.5 … 0.98 (α_s = 1: every context block kept; the selection does
not depend on the pseudo-keys). The *same* plans are then executed with each pseudo-key variant for the blocks
that enter as pseudo-keys:

- ``mean``: one block mean per block, bias log n (the mode's ``pseudo_block = b``);
- ``sub2`` / ``sub4``: the means of 2 / 4 contiguous sub-blocks (``pseudo_block = b/2, b/4``, what the mode has);
- ``kmeans2`` / ``kmeans4``: 2 / 4 centroids per block from Lloyd's k-means on the block's keys (5 iterations,
  started from the contiguous sub-blocks), each with the mean value and log-size bias of its cluster;
- ``mean+var``: one block mean with a variance-aware bias, log n + ½·scale²·Σ_d q_d²·Var_d(k) (the second-order
  term of Σ_t exp(q·k_t) for keys spread around their mean).

Cost = (exact + pseudo-key pairs) / N² (a pseudo-key pair costs what an exact pair costs); error = relative L1
of all target-query and all context-query outputs against dense attention. Printed: per variant, the cost of the
cheapest mass whose worst layer error (max of target and context) is within the budget, and the full table.

Usage: ``python benchmarks/bench_pseudo_keys.py [--threads 2] [--json out.json]`` (a few minutes on 2 CPU cores).
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

VARIANTS = ("mean", "sub2", "sub4", "kmeans2", "kmeans4", "mean+var")
MASSES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def _groups(blocks, m):
    """[nb, b] token index (−1 padding) and [nb, b] contiguous group of each token of a block (m groups)."""
    b = blocks.block_size
    ar = torch.arange(b)
    valid = ar[None, :] < blocks.counts[:, None]
    idx = torch.where(valid, blocks.starts[:, None] + ar[None, :], torch.full((1,), -1))
    grp = (ar[None, :] * m) // blocks.counts[:, None].clamp(min=1)
    return idx, valid, grp.clamp(max=m - 1)


def pseudo_keys(k, v, blocks, variant, iters=5):
    """Per block m pseudo-keys: (keys [nb, m, D], values [nb, m, D], log weights [nb, m], var [nb, D] or None)."""
    m = {"mean": 1, "sub2": 2, "sub4": 4, "kmeans2": 2, "kmeans4": 4, "mean+var": 1}[variant]
    idx, valid, grp = _groups(blocks, m)
    kt = k[idx.clamp(min=0)] * valid[..., None]  # [nb, b, D]
    vt = v[idx.clamp(min=0)] * valid[..., None]
    for it in range(iters + 1 if variant.startswith("kmeans") else 1):
        onehot = torch.nn.functional.one_hot(grp, m).to(k.dtype) * valid[..., None]  # [nb, b, m]
        n = onehot.sum(1)  # [nb, m]
        kc = torch.einsum("nbm,nbd->nmd", onehot, kt) / n.clamp(min=1)[..., None]
        if variant.startswith("kmeans") and it < iters:
            d = ((kt[:, :, None, :] - kc[:, None, :, :]) ** 2).sum(-1).masked_fill((n == 0)[:, None, :], float("inf"))
            grp = d.argmin(-1)
    vc = torch.einsum("nbm,nbd->nmd", onehot, vt) / n.clamp(min=1)[..., None]
    logw = torch.log(n).masked_fill(n == 0, float("-inf"))
    var = None
    if variant == "mean+var":
        var = (((kt - kc) ** 2) * valid[..., None]).sum(1) / n.clamp(min=1)  # [nb, D]
    return kc, vc, logw, var


def execute(q, k, v, plan, blocks, variant, scale):
    """Output [N, H, D] of the plan (batch entry 0) with the variant's pseudo-keys."""
    N, H, D = q.shape
    exact = plan.exact_mask()[0]  # [H, nb, nb]
    approx = plan.approx_mask()[0]
    tb = blocks.token_block
    out = torch.empty_like(q)
    for h in range(H):
        kc, vc, logw, var = pseudo_keys(k[:, h], v[:, h], blocks, variant)
        nb, m, _ = kc.shape
        s_ex = (q[:, h] @ k[:, h].T) * scale  # [N, N]
        s_ex = s_ex.masked_fill(~exact[h][tb][:, tb], float("-inf"))
        s_ps = (q[:, h] @ kc.reshape(nb * m, D).T) * scale + logw.reshape(-1)[None, :]  # [N, nb*m]
        if var is not None:
            s_ps = s_ps + 0.5 * scale ** 2 * ((q[:, h] ** 2) @ var.T).repeat_interleave(m, 1)
        s_ps = s_ps.masked_fill(~approx[h][tb].repeat_interleave(m, 1), float("-inf"))
        s = torch.cat([s_ex, s_ps], 1)
        p = torch.softmax(s, 1)
        out[:, h] = p[:, :N] @ v[:, h] + p[:, N:] @ vc.reshape(nb * m, D)
    return out


def run(workload, a):
    model = workload_model(workload, a)
    spec = model.spec
    rows = []
    for mass in MASSES:
        cfg = ISAConfig("adaptive", mass=mass, alpha_s=1.0, block_size=a.block_size)
        acc = {v: VariantErrors(spec.layers) for v in VARIANTS}
        for layer in range(spec.layers):
            for s in a.held_out:
                q, k, v, layout = model.sample(layer, s, dtype=torch.float64)
                blocks = layout.blocks(a.block_size)
                plan = plan_reference(q, k, layout, cfg)
                N = q.shape[1]
                sc = q.shape[-1] ** -0.5
                dense = torch.softmax(torch.einsum("nhd,mhd->hnm", q[0], k[0]) * sc, -1)
                dense = torch.einsum("hnm,mhd->nhd", dense, v[0])
                kinds = blocks.kinds[blocks.token_block]
                e_pairs, _ = plan.pair_counts()
                n_pseudo_blocks = plan.approx_mask()[0].sum(-1).double()  # [H, nb]
                rows_per_block = blocks.counts.double()
                for var in VARIANTS:
                    o = execute(q[0], k[0], v[0], plan, blocks, var, sc)
                    m = {"mean": 1, "sub2": 2, "sub4": 4, "kmeans2": 2, "kmeans4": 4, "mean+var": 1}[var]
                    p_pairs = float((n_pseudo_blocks * rows_per_block).sum()) * m
                    acc[var].costs.append((e_pairs + p_pairs) / (N * N * q.shape[2]))
                    acc[var].add(layer, o, dense, kinds)
        rows += mass_rows(acc, workload, mass)
    return rows


def main(argv=None):
    return lever_study_main(__doc__.split("\n")[0], run, VARIANTS, argv)


if __name__ == "__main__":
    sys.exit(main())
