"""Error against cost for ISA's two selection modes (fixed ratios, adaptive) on the synthetic ICL workload.

Two studies:

``--flops`` (any device, CPU is fine: FLOPs do not depend on the device)
    On a :class:`~isa_plugin.calibration.synthetic.SyntheticModel` (default: the package's default spec),
    measure for every setting of both modes and every layer and head the exact output error (relative L1 of
    target-query and context-query outputs against dense attention, all tokens) and the relative FLOPs
    ((exact + pseudo pairs) / N²) on *calibration* samples; pick per layer the cheapest setting of each mode
    whose errors stay within ``margin × budget`` (layer-wide, and per head by a Lagrangian search, keeping the
    cheaper), then report the errors and FLOPs of those choices on *held-out* samples, and the FLOP ratio
    adaptive / fixed. Errors come from per-key-block softmax sums (one score pass per head serves every
    setting); ``--check`` compares them with the reference executors on a few settings first.

default (GPU timing; ``--tiny`` runs the same code on CPU at a tiny size)
    At N = 65,536 and 65,520, H = 40, D = 128, bf16: time (``triton.testing.do_bench``, median) the fixed
    mode (``isa_attention``, Triton kernels) and the adaptive mode (:func:`adaptive_attention_flex`) over
    their settings, the whole call including planning, and cuDNN dense attention; the error of each output
    against cuDNN's dense output on a held-out synthetic sample. Each output is first checked against the
    reference semantics of its own plan on sampled rows (FlashAttention's rule); a failing check gets no
    time. Prints a table, the two Pareto fronts (time vs max(target, context) error), the fastest setting
    of each mode within the budget, and writes a PNG.

Examples:
    python benchmarks/bench_pareto.py --flops                       # CPU, minutes
    python benchmarks/bench_pareto.py --tiny                        # CPU smoke run of the timing study
    python benchmarks/bench_pareto.py --n 65536 65520 --heads 40 --out benchmarks/results/pareto
    python benchmarks/bench_pareto.py --n 65536 --modes adaptive --adaptive-block-sizes 128 --out ...   # a part

The first adaptive call per (N, block size) compiles FlexAttention (not timed); split long runs with
``--n``, ``--modes`` and ``--adaptive-block-sizes`` (each run writes its own table, JSON and PNG).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.config import AdaptiveSettings  # noqa: E402
from isa_plugin.calibration.synthetic import SyntheticModel, SyntheticSpec, synthetic_qkv  # noqa: E402
from isa_plugin.config import ISAConfig  # noqa: E402
from isa_plugin.kernels.adaptive_reference import (  # noqa: E402
    execute_adaptive_reference,
    plan_adaptive,
    plan_pair_counts,
    sub_blocks,
)
from isa_plugin.kernels.reference import (  # noqa: E402
    dense_attention_reference,
    execute_plan_reference,
    plan_reference,
    pool_blocks,
)
from isa_plugin.layout import CONTEXT, TARGET  # noqa: E402

FIXED_GRID = dict(alpha_s=(0.25, 0.5, 1.0), alpha_f=(0.125, 0.25, 0.5, 0.75, 1.0), alpha_ns=(0.03125, 0.0625, 0.125, 0.25),
                  sharpness=("topk_mass", "l2"))
ADAPTIVE_GRID = dict(mass=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99), pseudo_block=(64, 16),
                     alpha_s=(0.25, 0.5, 1.0))


def fixed_settings(grid=FIXED_GRID, block_size=64):
    return [ISAConfig(alpha_s=s, alpha_f=f, alpha_ns=n, sharpness=m, block_size=block_size, backend="reference")
            for m in grid["sharpness"] for s in grid["alpha_s"] for f in grid["alpha_f"] for n in grid["alpha_ns"]]


def adaptive_settings(grid=ADAPTIVE_GRID, block_size=64):
    return [AdaptiveSettings(mass=p, pseudo_block=min(ps, block_size), alpha_s=s, block_size=block_size)
            for s in grid["alpha_s"] for ps in grid["pseudo_block"] for p in grid["mass"]]


def describe(st) -> str:
    if isinstance(st, ISAConfig):
        return f"fixed a_s={st.alpha_s} a_f={st.alpha_f} a_ns={st.alpha_ns} {st.sharpness}"
    return f"adaptive p={st.mass} s={st.pseudo_block} a_s={st.alpha_s} b={st.block_size}"


def plan_of(st, q, k, v, layout):
    """(kv_keep [B, H, nb], exact_kv [B, H, nb, nb], pseudo_block, blocks) of either mode's reference plan."""
    if isinstance(st, ISAConfig):
        p = plan_reference(q, k, v, layout, st)
        return p.kv_keep, p.exact_kv, st.block_size, p.blocks
    p = plan_adaptive(q, k, layout, st)
    return p.kv_keep, p.exact_kv, p.pseudo_block, p.blocks


# ============================================================================ FLOP study (device-independent)
class HeadEngine:
    """Outputs of any plan of one head from per-key-block softmax sums, exact (no sampling).

    For query token t and key block j: Y[t, j] = Σ_{r∈j} e^{s_tr − m_t} v_r, Z[t, j] = Σ_{r∈j} e^{s_tr − m_t};
    for pseudo-key σ of size c_σ: A[t, σ] = c_σ e^{q_t·k̄_σ·scale − m_t}. A plan's output is
    (Σ_exact Y + Σ_pseudo A v̄) / (Σ_exact Z + Σ_pseudo A), the executors' single softmax.
    """

    def __init__(self, q, k, v, blocks, pseudo_sizes, scale):
        N, D = q.shape
        dev = q.device
        b = blocks.block_size
        self.tb = blocks.token_block.to(dev)
        s = (q @ k.T) * scale
        self.m = s.amax(-1, keepdim=True)
        e = torch.exp(s - self.m)
        ar = torch.arange(b, device=dev)
        idx = blocks.starts.to(dev)[:, None] + ar[None, :]
        valid = ar[None, :] < blocks.counts.to(dev)[:, None]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        ep = e[:, idx] * valid  # [N, nb, b]
        self.Z = ep.sum(-1)
        self.Y = torch.einsum("tjb,jbd->tjd", ep, v[idx] * valid[..., None])
        self.dense = self.Y.sum(1) / self.Z.sum(1, keepdim=True)
        self.pseudo = {}
        for ps in pseudo_sizes:
            sub, parent = sub_blocks(blocks, ps)
            sub = sub.to(dev)
            kb = pool_blocks(k[None, :, None], sub)[0, 0]
            vb = pool_blocks(v[None, :, None], sub)[0, 0]
            a = sub.counts.to(q.dtype) * torch.exp(q @ kb.T * scale - self.m)
            self.pseudo[ps] = (a, vb, parent.to(dev))

    def output(self, exact, keep, ps):
        """exact [nb, nb] bool, keep [nb] bool, pseudo size -> [N, D]."""
        w = exact[self.tb].to(self.Y.dtype)  # [N, nb]
        num = torch.bmm(w[:, None, :], self.Y)[:, 0]
        den = (w * self.Z).sum(-1)
        a, vb, parent = self.pseudo[ps]
        ap = (keep[None, :] & ~exact)[self.tb][:, parent].to(a.dtype) * a
        return (num + ap @ vb) / (den + ap.sum(-1))[:, None]


def measure_split(model, layer, seeds, settings, dtype=torch.float32, log=None, kind_cost=None):
    """num [O, H, 2] (Σ|o−o*|₁ per kind), den [H, 2], cost [O, H] (relative FLOPs, mean over samples).

    ``kind_cost``: a [O, H, 2] tensor that receives the cost of the target-query and context-query rows.
    """
    H = model.spec.heads
    O = len(settings)
    num = torch.zeros(O, H, 2, dtype=torch.float64)
    den = torch.zeros(H, 2, dtype=torch.float64)
    cost = torch.zeros(O, H, dtype=torch.float64)
    for seed in seeds:
        q, k, v, layout = model.sample(layer, seed, dtype=dtype)
        N, D = q.shape[1], q.shape[3]
        plans = [plan_of(st, q, k, v, layout) for st in settings]
        blocks = plans[0][3]
        kinds = blocks.kinds[blocks.token_block]
        sel = [(kinds == TARGET), (kinds == CONTEXT)]
        for o, (keep, exact, ps, bl) in enumerate(plans):
            e, a = plan_pair_counts(bl, keep, exact, ps, per_head=True)
            cost[o] += ((e + a) / (N * N)).cpu() / len(seeds)
            if kind_cost is not None:
                cnt = bl.counts.double()
                npseudo = torch.ceil(cnt / ps)
                approx = keep[:, :, None, :] & ~exact
                for kid, kk in enumerate((TARGET, CONTEXT)):
                    rows = cnt * (bl.kinds == kk)
                    ek = torch.einsum("bhij,i,j->h", exact.double(), rows, cnt)
                    ak = torch.einsum("bhij,i,j->h", approx.double(), rows, npseudo)
                    kind_cost[o, :, kid] += (ek + ak) / (N * N) / len(seeds)
        sizes = sorted({p[2] for p in plans})
        for h in range(H):
            eng = HeadEngine(q[0, :, h].double() if dtype == torch.float64 else q[0, :, h], k[0, :, h], v[0, :, h], blocks, sizes,
                             1.0 / math.sqrt(D))
            d = eng.dense
            for kk in range(2):
                den[h, kk] += float(d[sel[kk]].abs().sum())
            for o, (keep, exact, ps, _) in enumerate(plans):
                out = eng.output(exact[0, h], keep[0, h], ps)
                diff = (out - d).abs().sum(-1)
                for kk in range(2):
                    num[o, h, kk] += float(diff[sel[kk]].sum())
        if log:
            log(f"  layer {layer} sample {seed}: {O} settings measured")
    return num, den, cost


def select(num, den, cost, budget, margin=0.85):
    """Cheapest choice per head (option index, or -1 for dense) with the layer's errors within margin × budget.

    Layer-wide single settings and per-head choices (Lagrangian over each head's options, dense included)
    are both tried; the cheaper wins. num [O, H, 2], den [H, 2], cost [O, H]. Returns (choice [H], cost).
    """
    O, H, _ = num.shape
    lim = torch.tensor([budget * margin] * 2, dtype=torch.float64)
    dsum = den.sum(0).clamp(min=1e-300)
    err = num.sum(1) / dsum  # [O, 2]
    ok = (err <= lim + 1e-12).all(-1)
    best = ([-1] * H, 1.0)
    mc = cost.mean(1)
    if bool(ok.any()):
        o = int(torch.argmin(torch.where(ok, mc, torch.full_like(mc, math.inf))))
        if float(mc[o]) < best[1]:
            best = ([o] * H, float(mc[o]))
    # per head: options + dense
    g = torch.cat([num / dsum, torch.zeros(1, H, 2, dtype=torch.float64)])  # [O+1, H, 2]
    c = torch.cat([cost, torch.ones(1, H, dtype=torch.float64)])  # [O+1, H]
    for rho in (0.25, 1.0, 4.0):
        pen = rho * g[..., 0] / lim[0] + g[..., 1] / lim[1]

        def solve(lam):
            ch = torch.argmin(c + lam * pen, dim=0)  # [H]
            e = g[ch, torch.arange(H)].sum(0)
            return ch, bool((e <= lim + 1e-12).all()), float(c[ch, torch.arange(H)].mean())

        lo, hi = -6.0, 8.0
        ch, feas, cc = solve(10**hi)
        if not feas:
            continue
        found = (ch, cc)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            ch, feas, cc = solve(10**mid)
            if feas:
                hi, found = mid, (ch, cc)
            else:
                lo = mid
        if found[1] < best[1]:
            best = ([(-1 if int(x) == O else int(x)) for x in found[0]], found[1])
    return best


def evaluate_choice(choice, num, den, cost):
    """(target error, context error, relative FLOPs) of a per-head choice on measured sums."""
    H = len(choice)
    e = torch.zeros(2, dtype=torch.float64)
    c = 0.0
    for h, o in enumerate(choice):
        if o >= 0:
            e += num[o, h]
            c += float(cost[o, h])
        else:
            c += 1.0
    e = e / den.sum(0).clamp(min=1e-300)
    return float(e[0]), float(e[1]), c / H


def check_engine(model, settings, dtype=torch.float64):
    """Largest |HeadEngine output − reference executor output| over a few settings (float64)."""
    q, k, v, layout = model.sample(0, 0, dtype=dtype)
    D = q.shape[3]
    worst = 0.0
    for st in settings:
        keep, exact, ps, blocks = plan_of(st, q, k, v, layout)
        if isinstance(st, ISAConfig):
            ref = execute_plan_reference(q, k, v, plan_reference(q, k, v, layout, st))
        else:
            ref = execute_adaptive_reference(q, k, v, plan_adaptive(q, k, layout, st))
        for h in range(q.shape[2]):
            eng = HeadEngine(q[0, :, h], k[0, :, h], v[0, :, h], blocks, [ps], 1.0 / math.sqrt(D))
            worst = max(worst, float((eng.output(exact[0, h], keep[0, h], ps) - ref[0, :, h]).abs().max()))
    dense = dense_attention_reference(q, k, v)
    eng = HeadEngine(q[0, :, 0], k[0, :, 0], v[0, :, 0], blocks, [64], 1.0 / math.sqrt(D))
    worst = max(worst, float((eng.dense - dense[0, :, 0]).abs().max()))
    return worst


def flops_study(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SyntheticSpec(frames=args.frames, height=args.height, width=args.width, heads=args.study_heads,
                         head_dim=args.study_dim, layers=args.layers)
    model = SyntheticModel(spec, seed=args.model_seed)
    fx = fixed_settings()
    ad = adaptive_settings()
    log = (lambda s: print(s, flush=True)) if args.verbose else None
    if args.check:
        small = SyntheticModel(SyntheticSpec(frames=2, height=8, width=8, heads=2, head_dim=32, layers=2), seed=1)
        worst = check_engine(small, [fx[7], fx[-1], ad[3], ad[-1], ad[len(ad) // 2]])
        print(f"engine vs reference executors (float64): max abs diff {worst:.2e}", flush=True)
        if worst > 1e-9:
            raise SystemExit("engine check failed")
    N = 2 * spec.tokens_per_video
    print(f"FLOP study: N={N} H={spec.heads} D={spec.head_dim} layers={spec.layers} budget={args.budget} "
          f"margin={args.margin}; calibration samples {args.calib_seeds}, held-out {args.held_seeds}; "
          f"{len(fx)} fixed and {len(ad)} adaptive settings", flush=True)
    rows = []
    t0 = time.time()
    for layer in range(spec.layers):
        res = {}
        kc = {"calib": torch.zeros(len(ad), spec.heads, 2, dtype=torch.float64),
              "held": torch.zeros(len(ad), spec.heads, 2, dtype=torch.float64)}
        for mode, sts in (("fixed", fx), ("adaptive", ad), ("both", fx + ad), ("adaptive_tc", None)):
            if mode == "adaptive_tc":
                # target and context query blocks with their own mass (same alpha_s and pseudo size): target
                # errors and row costs come from one setting, context ones from another
                combos = [(i, j) for i, a in enumerate(ad) for j, b in enumerate(ad)
                          if (a.alpha_s, a.pseudo_block) == (b.alpha_s, b.pseudo_block)]
                it = torch.tensor([c[0] for c in combos])
                ic = torch.tensor([c[1] for c in combos])
                def combine(split, kcost):
                    n_, d_, _ = split
                    n2 = torch.stack([n_[it, :, 0], n_[ic, :, 1]], -1)
                    c2 = kcost[it, :, 0] + kcost[ic, :, 1]
                    return n2, d_, c2
                calib = combine(res["adaptive"]["calib"], kc["calib"])
                held = combine(res["adaptive"]["held"], kc["held"])
                sts = [f"{ad[i].mass}/{ad[j].mass} s={ad[i].pseudo_block} a_s={ad[i].alpha_s}" for i, j in combos]
            elif mode == "both":
                # both modes offered: the union of options (per head the cheaper mode may be chosen)
                nc = torch.cat([res["fixed"]["calib"][0], res["adaptive"]["calib"][0]])
                cc = torch.cat([res["fixed"]["calib"][2], res["adaptive"]["calib"][2]])
                nh = torch.cat([res["fixed"]["held"][0], res["adaptive"]["held"][0]])
                ch = torch.cat([res["fixed"]["held"][2], res["adaptive"]["held"][2]])
                calib = (nc, res["fixed"]["calib"][1], cc)
                held = (nh, res["fixed"]["held"][1], ch)
            else:
                is_ad = mode == "adaptive"
                calib = measure_split(model, layer, args.calib_seeds, sts, log=log, kind_cost=kc["calib"] if is_ad else None)
                held = measure_split(model, layer, args.held_seeds, sts, log=log, kind_cost=kc["held"] if is_ad else None)
            choice, _ = select(*calib, args.budget, args.margin)
            et, ec, c = evaluate_choice(choice, *held)
            et_c, ec_c, c_c = evaluate_choice(choice, *calib)
            names = sorted({(sts[o] if isinstance(sts[o], str) else describe(sts[o])) if o >= 0 else "dense" for o in choice})
            res[mode] = dict(calib=calib, held=held, choice=choice, err_t=et, err_c=ec, flops=c, flops_calib=c_c,
                             err_t_calib=et_c, err_c_calib=ec_c, settings=names)
            print(f"layer {layer} {mode:8s}: held-out FLOPs {c:.3f} err t/c {et:.4f}/{ec:.4f} "
                  f"(calibration {c_c:.3f}, {et_c:.4f}/{ec_c:.4f}); {len(names)} distinct settings "
                  f"[{time.time() - t0:.0f}s]", flush=True)
        rows.append({m: {k: v for k, v in r.items() if k not in ("calib", "held")} for m, r in res.items()})
    modes = ("fixed", "adaptive", "both", "adaptive_tc")
    tot = {m: sum(r[m]["flops"] for r in rows) / len(rows) for m in modes}
    lines = ["| layer | fixed FLOPs | fixed err t/c | adaptive FLOPs | adaptive err t/c | both FLOPs | both err t/c | "
             "adaptive, own mass per query kind, FLOPs | err t/c |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(f"{r[m]['flops']:.3f} | {r[m]['err_t']:.4f}/{r[m]['err_c']:.4f}"
                                               for m in modes) + " |")
    lines.append(f"| mean | {tot['fixed']:.3f} | | {tot['adaptive']:.3f} | | {tot['both']:.3f} | | {tot['adaptive_tc']:.3f} | |")
    table = "\n".join(lines)
    print(table)
    print(f"FLOP ratio at budget {args.budget} (held-out): adaptive / fixed = {tot['adaptive'] / tot['fixed']:.3f}, "
          f"both modes offered / fixed = {tot['both'] / tot['fixed']:.3f}, adaptive with a mass per query kind / fixed = "
          f"{tot['adaptive_tc'] / tot['fixed']:.3f}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pareto_flops.json"), "w") as f:
            json.dump(dict(spec=spec.__dict__, budget=args.budget, margin=args.margin, calib=args.calib_seeds,
                           held=args.held_seeds, rows=rows, mean=tot, torch=torch.__version__), f, indent=1, default=str)
        with open(os.path.join(args.out, "pareto_flops.md"), "w") as f:
            f.write(table + "\n")
    return rows, tot


# ============================================================================ GPU timing study
SHAPES = {65536: (8, 64, 64), 65520: (21, 30, 52), 32768: (8, 32, 64), 512: (2, 8, 16), 1040: (2, 10, 26)}


def timer(fn, cuda: bool):
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=300, return_mode="median")
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[1]


def rel_l1(out, dense, sel):
    o, d = out[0, sel].float(), dense[0, sel].float()
    return float((o - d).abs().sum() / d.abs().sum().clamp(min=1e-30))


def check_plan_rows(q, k, v, isa_plan, out, gen, n_rows=256):
    """FlashAttention's rule on sampled rows: the output against its own plan's reference semantics."""
    from isa_plugin.kernels.testing import check_close, plan_rows

    N = q.shape[1]
    rows = torch.randperm(N, generator=gen)[:n_rows].sort().values
    rows = torch.unique(torch.cat([rows, torch.tensor([0, N // 2 - 1, N // 2, N - 1])])).to(q.device)
    ref = plan_rows(q, k, v, isa_plan, rows, chunk=32)
    base = plan_rows(q, k, v, isa_plan, rows, lowp=True, chunk=32)
    got = out[:, rows].float()
    ok, err, berr = check_close(got, ref, base, atol=1e-3 if q.dtype != torch.float32 else 1e-5)
    return ok, err, berr


def timing_study(args):
    from isa_plugin.attention import isa_attention
    from isa_plugin.kernels.adaptive_flex import adaptive_attention_flex, build_flex_inputs

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        dynamo.config.recompile_limit = max(getattr(dynamo.config, "recompile_limit", 8), 64)
    gpu = torch.cuda.get_device_name(dev) if cuda else "cpu"
    gen = torch.Generator().manual_seed(0)
    ns = args.n if not args.tiny else [512, 1040]
    H = args.heads if not args.tiny else 2
    D = 128 if not args.tiny else 32
    fixed = [ISAConfig(alpha_s=s, alpha_f=f, alpha_ns=n) for s in (0.25, 0.5, 1.0) for f in (0.25, 0.5, 0.75, 1.0)
             for n in (0.0625, 0.125)]
    adaptive = [AdaptiveSettings(mass=p, pseudo_block=ps, alpha_s=s, block_size=bs)
                for bs, pss in ((128, (128, 32, 16)), (64, (64, 16))) if bs in args.adaptive_block_sizes
                for ps in pss for s in (0.5, 1.0) for p in (0.7, 0.8, 0.9, 0.95, 0.98)]
    fixed = fixed if "fixed" in args.modes else []
    adaptive = adaptive if "adaptive" in args.modes else []
    if args.quick or args.tiny:
        fixed = fixed[::5]
        adaptive = adaptive[::7]
    rows = []
    for N in ns:
        f, hh, ww = SHAPES[N]
        q, k, v, layout = synthetic_qkv(f, hh, ww, H, head_dim=D, layer_depth=0.5, sample_seed=1000, device=dev, dtype=dtype)
        blocks = layout.blocks(64)
        kinds = blocks.kinds[blocks.token_block].to(dev)
        sel_t, sel_c = kinds == TARGET, kinds == CONTEXT
        if cuda:
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel

            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

            def dense_fn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        else:
            def dense_fn():
                return dense_attention_reference(q, k, v)
        dense = dense_fn()
        t_dense = timer(dense_fn, cuda)
        print(f"N={N} H={H} D={D} {dtype} on {gpu}: dense {t_dense:.2f} ms", flush=True)
        rows.append(dict(N=N, mode="dense", setting="cuDNN SDPA" if cuda else "torch", ms=t_dense, err_t=0.0, err_c=0.0,
                         flops_rel=1.0, ok=True))
        for st in fixed + adaptive:
            row = dict(N=N, mode="fixed" if isinstance(st, ISAConfig) else "adaptive", setting=describe(st))
            try:
                if isinstance(st, ISAConfig):
                    cfg = st.replace(backend="triton" if cuda else "reference")
                    out = isa_attention(q, k, v, layout, cfg)
                    if cuda:
                        from isa_plugin.kernels.plan import compact_to_reference, plan_compact

                        cp = plan_compact(q, k, layout, cfg, v=v)
                        e, a = cp.pair_counts()
                        plan = compact_to_reference(cp)
                    else:
                        plan = plan_reference(q, k, v, layout, cfg)
                        e, a = plan_pair_counts(plan.blocks, plan.kv_keep, plan.exact_kv, cfg.block_size)
                    fn = lambda: isa_attention(q, k, v, layout, cfg)  # noqa: E731
                    plan_fn = (lambda: plan_compact(q, k, layout, cfg, v=v)) if cuda else (lambda: plan_reference(q, k, v, layout, cfg))  # noqa: E731
                else:
                    out, aplan = adaptive_attention_flex(q, k, v, layout, st, return_plan=True)
                    e, a = aplan.pair_counts()
                    plan = aplan.to_isa_plan()
                    fn = lambda: adaptive_attention_flex(q, k, v, layout, st)  # noqa: E731
                    plan_fn = lambda: build_flex_inputs(q, k, v, layout, st)  # noqa: E731
                ok, err, berr = check_plan_rows(q, k, v, plan, out, gen)
                del plan
            except Exception as ex:  # a setting the path cannot run is reported, not fatal
                row.update(ok=False, note=f"{type(ex).__name__}: {ex}"[:200])
                print(f"  {row['setting']}: ERROR {row['note']}", flush=True)
                rows.append(row)
                continue
            row.update(ok=ok, check_err=err, check_base=berr, err_t=rel_l1(out, dense, sel_t), err_c=rel_l1(out, dense, sel_c),
                       exact_pairs=e, pseudo_pairs=a, flops_rel=(e + a) / (N * N * H), D=D)
            del out
            if not ok:
                print(f"  {row['setting']}: FAIL correctness err {err:.2e} (torch {berr:.2e}); no time", flush=True)
                rows.append(row)
                continue
            row["ms"] = timer(fn, cuda)
            row["plan_ms"] = timer(plan_fn, cuda)
            row["speedup"] = t_dense / row["ms"]
            row["exact_tflops"] = 4.0 * D * e / (row["ms"] * 1e9)
            print(f"  {row['setting']}: {row['ms']:.2f} ms x{row['speedup']:.2f} plan {100 * row['plan_ms'] / row['ms']:.1f}% "
                  f"FLOPs {row['flops_rel']:.3f} err t/c {row['err_t']:.4f}/{row['err_c']:.4f}", flush=True)
            rows.append(row)
        del q, k, v, dense
        if cuda:
            torch.cuda.empty_cache()
    report(rows, args, gpu)
    if args.cost_model and cuda:
        fit_adaptive_cost(rows, gpu, args.cost_model)
    return rows


def fit_adaptive_cost(rows, gpu, path):
    """Fit ms = a·E + b·A + c over the adaptive rows (E, A: exact / pseudo pairs in 1e9, scaled by D/128; least
    squares weighted by 1/ms) and merge ``adaptive_ms_per_gexact_pair``, ``adaptive_ms_per_gpseudo_pair`` and
    ``adaptive_ms_per_call`` into the card's entry of ``path`` (the calibration's cost model reads them)."""
    rs = [r for r in rows if r["mode"] == "adaptive" and "ms" in r]
    if len(rs) < 3:
        print("adaptive cost model: need at least 3 measured settings", flush=True)
        return
    A = torch.tensor([[r["exact_pairs"] / 1e9 * r["D"] / 128, r["pseudo_pairs"] / 1e9 * r["D"] / 128, 1.0] for r in rs],
                     dtype=torch.float64)
    y = torch.tensor([r["ms"] for r in rs], dtype=torch.float64)
    w = 1.0 / y
    sol = torch.linalg.lstsq(A * w[:, None], (y * w).unsqueeze(1)).solution.squeeze(1)
    rel = float(((A @ sol - y).abs() / y).max())
    a, b, c = (max(float(x), 0.0) for x in sol)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    card = data.setdefault("cards", {}).setdefault(gpu, {})
    card.update(adaptive_ms_per_gexact_pair=a, adaptive_ms_per_gpseudo_pair=b, adaptive_ms_per_call=c,
                adaptive_fitted_on=len(rs), adaptive_max_rel_error=rel)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"adaptive cost model for {gpu}: a={a:.4f} b={b:.4f} c={c:.3f} ms (max rel err {rel:.2f}) -> {path}", flush=True)


def pareto(points):
    """Rows not dominated in (ms, max error), sorted by time."""
    pts = sorted((r for r in points if r.get("ok") and "ms" in r), key=lambda r: (r["ms"], max(r["err_t"], r["err_c"])))
    front, best = [], math.inf
    for r in pts:
        e = max(r["err_t"], r["err_c"])
        if e < best:
            front.append(r)
            best = e
    return front


def report(rows, args, gpu):
    lines = ["| N | mode | setting | ms | speed-up | plan % | rel. FLOPs | exact TFLOP/s | err target | err context | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for N in sorted({r["N"] for r in rows}):
        rs = [r for r in rows if r["N"] == N]
        fronts = {m: pareto([r for r in rs if r["mode"] == m]) for m in ("fixed", "adaptive")}
        on_front = {id(r) for fr in fronts.values() for r in fr}
        for r in rs:
            if "ms" in r:
                lines.append(f"| {N} | {r['mode']} | {r['setting']} | {r['ms']:.2f} | {r.get('speedup', 1.0):.2f}× | "
                             f"{100 * r.get('plan_ms', 0) / r['ms']:.1f} | {r['flops_rel']:.3f} | {r.get('exact_tflops', float('nan')):.0f} | "
                             f"{r['err_t']:.4f} | {r['err_c']:.4f} | {'*' if id(r) in on_front else ''} |")
            else:
                lines.append(f"| {N} | {r['mode']} | {r['setting']} | – | – | – | – | – | – | – | {'FAIL' if 'note' not in r else 'ERROR'} |")
        best = {}
        for m in ("fixed", "adaptive"):
            okr = [r for r in rs if r["mode"] == m and "ms" in r and r["err_t"] <= args.budget and r["err_c"] <= args.budget]
            best[m] = min(okr, key=lambda r: r["ms"]) if okr else None
        s = f"N={N}: fastest within budget {args.budget}: " + "; ".join(
            f"{m} {best[m]['setting']} {best[m]['ms']:.2f} ms (FLOPs {best[m]['flops_rel']:.3f})" if best[m] else f"{m} none"
            for m in best)
        if best["fixed"] and best["adaptive"]:
            s += f"; adaptive speed-up over fixed {best['fixed']['ms'] / best['adaptive']['ms']:.2f}×"
        summary.append(s)
    table = "\n".join(lines)
    print(table)
    for s in summary:
        print(s)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(args.out, "pareto.md"), "w") as f:
            f.write(f"### {gpu}, torch {torch.__version__}, {stamp}\n\n{table}\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
        with open(os.path.join(args.out, "pareto.json"), "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, date=stamp, rows=rows), f, indent=1, default=str)
        plot(rows, os.path.join(args.out, "pareto.png"), gpu)


def plot(rows, path, gpu):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4.5), squeeze=False)
    for ax, N in zip(axes[0], ns):
        rs = [r for r in rows if r["N"] == N]
        for m, c in (("fixed", "tab:blue"), ("adaptive", "tab:orange")):
            pts = [r for r in rs if r["mode"] == m and "ms" in r]
            ax.scatter([r["ms"] for r in pts], [max(r["err_t"], r["err_c"]) for r in pts], s=12, color=c, alpha=0.4)
            fr = pareto(pts)
            ax.plot([r["ms"] for r in fr], [max(r["err_t"], r["err_c"]) for r in fr], "-o", color=c, label=f"{m} (front)")
        d = next(r for r in rs if r["mode"] == "dense")
        ax.axvline(d["ms"], color="gray", ls="--", label="dense")
        ax.set_xlabel("ms per call")
        ax.set_ylabel("max(target, context) relative L1")
        ax.set_yscale("log")
        ax.set_title(f"N={N}, {gpu}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flops", action="store_true", help="the device-independent FLOP study (selection on calibration samples)")
    ap.add_argument("--check", action="store_true", help="with --flops: check the error engine against the reference executors")
    ap.add_argument("--tiny", action="store_true", help="timing study on CPU at tiny sizes (smoke run)")
    ap.add_argument("--quick", action="store_true", help="fewer settings in the timing study")
    ap.add_argument("--n", type=int, nargs="+", default=[65536, 65520], choices=sorted(SHAPES))
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["fixed", "adaptive"], choices=["fixed", "adaptive"],
                    help="timing study: modes to run (split long runs)")
    ap.add_argument("--adaptive-block-sizes", type=int, nargs="+", default=[128, 64], choices=[64, 128],
                    help="timing study: block sizes of the adaptive settings")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--margin", type=float, default=0.85)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--study-heads", type=int, default=8)
    ap.add_argument("--study-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--held-seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for the FLOP study (0: torch's default)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the table (md), the rows (json) and the PNG")
    ap.add_argument("--cost-model", default=None,
                    help="timing study on CUDA: fit the adaptive mode's time per exact / pseudo pair and merge it into this JSON")
    args = ap.parse_args(argv)
    if args.flops:
        return flops_study(args)
    return timing_study(args)


if __name__ == "__main__":
    main()
