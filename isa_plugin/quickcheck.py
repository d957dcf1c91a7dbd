"""``python -m isa_plugin.quickcheck``: ISA against dense attention on a built-in workload.

Prints the error of ISA (default ratios) against exact attention, the plan's counts and its relative
cost. Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math

import torch

from .attention import isa_attention
from .config import ISAConfig
from .kernels.reference import dense_attention_reference, plan_reference
from .layout import Layout


def _workload(frames: int, side: int, heads: int, dim: int, seed: int):
    """Target and context videos on a frames x side x side grid; context correlated with the target."""
    g = torch.Generator().manual_seed(seed)
    n = frames * side * side
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([t, y, x], -1).reshape(n, 3).float()
    freqs = torch.randn(3, dim // 2, generator=g) * 0.4
    phase = pos @ freqs  # smooth content field over the grid
    content = torch.cat([phase.sin(), phase.cos()], -1)  # [n, dim]
    mix = torch.randn(heads, dim, dim, generator=g) / math.sqrt(dim)
    temps = torch.linspace(0.5, 3.0, heads)  # near-uniform to peaked heads

    def video(noise):
        c = content + noise * torch.randn(n, dim, generator=g)
        return torch.einsum("nd,hde->nhe", c, mix)

    tgt, ctx = video(0.6), video(0.2)
    seq = torch.cat([tgt, ctx])[None]  # [1, 2n, H, D]
    q = seq * temps[None, None, :, None]
    k = seq + 0.3 * torch.randn(seq.shape, generator=g)
    v = torch.randn(seq.shape, generator=g)
    return q, k, v, Layout([("target", n), ("context", n)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m isa_plugin.quickcheck", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--side", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    q, k, v, layout = _workload(args.frames, args.side, args.heads, args.dim, args.seed)
    cfg = ISAConfig()
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    dense = dense_attention_reference(q, k, v)
    plan = plan_reference(q, k, v, layout, cfg)
    n_t = layout.num("target")
    rel = lambda a, b: float((a - b).abs().sum() / b.abs().sum())
    print(f"layout: {layout}  heads={args.heads} head_dim={args.dim}  config: {cfg.to_dict()}")
    print(f"served by: {info.backend}" + (f" (fallback: {info.reason})" if info.reason else ""))
    print(f"relative L1 error vs dense: target queries {rel(out[:, :n_t], dense[:, :n_t]):.4f}, "
          f"context queries {rel(out[:, n_t:], dense[:, n_t:]):.4f}")
    kinds = plan.blocks.kinds
    print(f"blocks: {int((kinds == 0).sum())} target, {int((kinds == 1).sum())} context (block_size={cfg.block_size})")
    for h in range(args.heads):
        print(
            f"  head {h}: kept context blocks {int(plan.kept_context[0, h].sum())}, "
            f"exact query blocks {int(plan.exact_query[0, h].sum())}, "
            f"exact key blocks per Taylor query block {int(plan.exact_kv[0, h][~plan.exact_query[0, h]].sum(-1).max())}"
        )
    print(f"relative cost (exact pairs + mean pairs) vs dense: {plan.relative_cost():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
