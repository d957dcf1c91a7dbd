"""Benchmark: one ISA plan shared by the CFG pair (``ISAConfig(share_plan=True)``) vs a plan per entry.

Workload: the structured synthetic ICL attention (``isa_plugin.calibration.synthetic``), batch 2. A CFG
pair sees the same video with a different text condition, so the two entries are the same sample with a
perturbation of the target tokens (``--perturb``, relative to their RMS); ``--pair independent`` uses two
different samples instead (the worst case for sharing).

Per setting it reports the median time of the whole call (pooling, planning, attention) with the kernels,
independent plans vs one shared plan, and the relative L1 error against dense attention (cuDNN SDPA in
the same dtype) of target-query outputs per entry and of the guided output uncond + s·(cond − uncond)
(``--guidance``), which amplifies any difference between the two entries' errors. Every output is first
checked against the reference semantics of its own plan on sampled rows; a failing check prints FAIL and
no time.

The shared plan runs on the kernels as: pool q, k per entry (Triton), average the block means over the
batch, plan once on the averaged means (expanded to the batch), execute per entry with each entry's own
tokens and pseudo-keys — the semantics of ``share_plan`` in the reference. The public
``isa_attention(..., share_plan=True)`` (the kernels' own share_plan) is timed as well.

Examples:
    python benchmarks/bench_cfg_share.py                                   # Wan 480p 81f ICL, 12 heads
    python benchmarks/bench_cfg_share.py --heads 40 --perturb 0.05 0.2 --guidance 5
    python benchmarks/bench_cfg_share.py --frames 8 --height 16 --width 16 --heads 4   # quick
    python benchmarks/bench_cfg_share.py ... --record benchmarks/CFG_SHARE.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin import ISAConfig, isa_attention  # noqa: E402
from isa_plugin.calibration.synthetic import synthetic_qkv  # noqa: E402
from isa_plugin.kernels.executor import execute_compact  # noqa: E402
from isa_plugin.kernels.compact import compact_to_block_plan  # noqa: E402
from isa_plugin.kernels.pooling import pool_blocks_triton  # noqa: E402
from isa_plugin.kernels.testing import check_close, plan_rows  # noqa: E402
from isa_plugin.selection.fixed_gpu import plan_compact, plan_compact_from_pooled  # noqa: E402


def cfg_pair(args, perturb, dtype):
    """q, k, v [2, N, H, D] of a CFG pair and the layout."""
    if args.pair == "independent":
        return synthetic_qkv(args.frames, args.height, args.width, args.heads, args.dim, layer_depth=args.depth,
                             seed=args.seed, device="cuda", dtype=dtype, batch=2)
    q, k, v, layout = synthetic_qkv(args.frames, args.height, args.width, args.heads, args.dim, layer_depth=args.depth,
                                    seed=args.seed, device="cuda", dtype=torch.float32)
    n_t = layout.num("target")
    t0 = 0 if layout.spans[0][0] == "target" else layout.num_tokens - n_t
    g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    out = []
    for x in (q, k, v):
        y = x.repeat(2, 1, 1, 1)
        tgt = y[1, t0 : t0 + n_t]
        rms = tgt.square().mean().sqrt()
        tgt += perturb * rms * torch.randn(tgt.shape, device="cuda", generator=g)
        out.append(y.to(dtype).contiguous())
    return (*out, layout)


def plan_shared(q, k, layout, cfg, scale):
    """The compact plan of the batch-mean block means, expanded to the batch (share_plan semantics)."""
    blocks = layout.blocks(cfg.block_size).to(q.device)
    qbar, kbar = pool_blocks_triton(q, k, starts=blocks.starts.int(), counts=blocks.counts.int(), block_size=cfg.block_size)
    qm = qbar.mean(0, keepdim=True).expand_as(qbar).contiguous()
    km = kbar.mean(0, keepdim=True).expand_as(kbar).contiguous()
    return plan_compact_from_pooled(qm, km, layout.blocks(cfg.block_size), cfg, scale)


def rel_l1(a, b):
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum().clamp_min(1e-30)).item()


def check_rows(q, k, v, cp, out, n_rows=256, seed=0):
    N = q.shape[1]
    g = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.cat([torch.randperm(N, generator=g)[:n_rows], torch.tensor([0, N - 1])])).to(q.device)
    plan = compact_to_block_plan(cp)
    ref = plan_rows(q, k, v, plan, rows, chunk=32)
    base = plan_rows(q, k, v, plan, rows, lowp=True, chunk=32)
    ok, err, berr = check_close(out[:, rows].float(), ref, base, atol=1e-3)
    return ok, err, berr


def dense(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if q.dtype == torch.float32:
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def selections_agree(cp_a, cp_b):
    """Fraction of (entry, head, query block, key block) exact selections equal in two plans."""
    a, b = compact_to_block_plan(cp_a).exact_mask(), compact_to_block_plan(cp_b).exact_mask()
    return (a == b).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=30)
    ap.add_argument("--width", type=int, default=52)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=float, default=0.5, help="synthetic layer depth in [0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--pair", default="cfg", choices=["cfg", "independent"])
    ap.add_argument("--perturb", type=float, nargs="+", default=[0.1], help="uncond = cond + perturb·RMS·noise on target tokens")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--alpha-s", type=float, nargs="+", default=[0.125, 0.5])
    ap.add_argument("--alpha-f", type=float, default=0.5)
    ap.add_argument("--alpha-ns", type=float, default=0.0625)
    ap.add_argument("--record", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)

    import triton

    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    perturbs = args.perturb if args.pair == "cfg" else [float("nan")]
    rows = []
    for perturb in perturbs:
        q, k, v, layout = cfg_pair(args, perturb, dtype)
        N = layout.num_tokens
        tsl = slice(0, layout.num("target")) if layout.spans[0][0] == "target" else slice(N - layout.num("target"), N)
        d = dense(q, k, v)
        d_guided = d[1] + args.guidance * (d[0] - d[1])
        scale = 1.0 / math.sqrt(args.dim)
        t_dense = triton.testing.do_bench(lambda: dense(q, k, v), warmup=10, rep=200, return_mode="median")
        for a_s in args.alpha_s:
            cfg = ISAConfig(alpha_s=a_s, alpha_f=args.alpha_f, alpha_ns=args.alpha_ns)
            res = {"perturb": perturb, "alpha_s": a_s}
            plans = {}
            for mode in ("independent", "shared"):
                cp = plan_compact(q, k, layout, cfg, scale, v=v) if mode == "independent" else plan_shared(q, k, layout, cfg, scale)
                out = execute_compact(q, k, v, cp, scale)
                torch.cuda.synchronize()
                ok, err, berr = check_rows(q, k, v, cp, out, seed=args.seed)
                plans[mode] = cp
                e = [rel_l1(out[i, tsl], d[i, tsl]) for i in range(2)]
                guided = out[1] + args.guidance * (out[0] - out[1])
                res[mode] = dict(ok=ok, err=err, berr=berr, err_cond=e[0], err_uncond=e[1],
                                 err_guided=rel_l1(guided[tsl], d_guided[tsl]))
                if not ok:
                    print(f"FAIL {mode} perturb={perturb} alpha_s={a_s}: kernel error {err:.3e} vs torch error {berr:.3e}")
                    continue
                if mode == "independent":
                    fn = lambda: execute_compact(q, k, v, plan_compact(q, k, layout, cfg, scale, v=v, defer_selections=True), scale)  # noqa: E731
                else:
                    fn = lambda: execute_compact(q, k, v, plan_shared(q, k, layout, cfg, scale), scale)  # noqa: E731
                res[mode]["ms"] = triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
            res["entries_agree"] = selections_agree(plans["independent"], plans["shared"])
            c2 = cfg.replace(share_plan=True)
            res["api_shared_ms"] = triton.testing.do_bench(lambda: isa_attention(q, k, v, layout, c2), warmup=10, rep=200,
                                                           return_mode="median")
            res["dense_ms"] = t_dense
            rows.append(res)
        del q, k, v, d
        torch.cuda.empty_cache()

    head = (f"CFG plan sharing, {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.date.today()}; {args.pair} pair, {args.frames}x{args.height}x{args.width} x2 tokens "
            f"(N={2 * args.frames * args.height * args.width}), H={args.heads}, D={args.dim}, {args.dtype}, batch 2, "
            f"alpha_f={args.alpha_f}, alpha_ns={args.alpha_ns}, guidance {args.guidance}")
    lines = [head, "",
             "| perturb | alpha_s | dense ms | indep. ms | shared ms | selections equal | err cond indep/shared | "
             "err uncond indep/shared | err guided indep/shared |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ms(r):
        return f"{r['ms']:.2f}" if "ms" in r else "FAIL"

    for r in rows:
        i, s = r["independent"], r["shared"]
        lines.append(
            f"| {r['perturb']:.3g} | {r['alpha_s']:.3g} | {r['dense_ms']:.2f} | {ms(i)} | {ms(s)} | {r['entries_agree']:.3f} | "
            f"{i['err_cond']:.4f} / {s['err_cond']:.4f} | {i['err_uncond']:.4f} / {s['err_uncond']:.4f} | "
            f"{i['err_guided']:.4f} / {s['err_guided']:.4f} |"
        )
        if "api_shared_ms" in r:
            lines[-1] += f" (isa_attention share_plan: {r['api_shared_ms']:.2f} ms)"
    text = "\n".join(lines)
    print(text)
    if args.record:
        with open(args.record, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
