"""Levers of the adaptive mode's accuracy per FLOP, measured on held-out samples of both synthetic workloads.

For each workload of :data:`~isa_plugin.calibration.synthetic.WORKLOADS` (default shape: 8 frames of 16 × 16
tokens per video, N = 4,096, 4 heads, D = 64, 3 layers; CPU, float32), calibration on samples 0, 1 and
``fit_profile`` at the budget (pair-count cost model, leave-one-sample-out check), then ``evaluate_synthetic``
on held-out samples 100, 101 (relative L1 of all target / context query outputs against dense attention; cost
= (exact + pseudo pairs) / N² of the held-out plans). One row per variant:

- ``fixed``: ``Grid()``, the fixed mode alone;
- ``former``: both modes, the former adaptive grid (9 masses 0.7 … 0.99, block and sub-block means) and the former
  margin search (shrink only): what the package calibrated before these levers;
- ``fine`` (``--with-fine``): the fine mass grid (48 masses 0.3 … 0.995, one measurement pass), former margin
  search, block and sub-block means;
- ``fine+bisect``: the fine grid and the margin bisection (:data:`~isa_plugin.calibration.heldout.MARGIN_BISECTIONS`),
  block and sub-block means as pseudo-keys: the calibration before k-means pseudo-keys;
- ``fine+bisect+kmeans``: the same with the default grid's pseudo-keys, 16-token k-means slots or one block mean per
  block (lever c);
- ``kmeans+low masses``: the package's calibration now: k-means pseudo-keys and the mass grid ``ADAPTIVE_MASS``
  (51 masses 0.05 … 0.995);
- ``kmeans+low masses+mean`` (``--with-both``): the same with 16-token sub-block means offered too;
- ``subblock-mass``: lever (b), a study only: the adaptive planner's pooled mass estimated from the means of
  16-token key sub-blocks (m_ij ∝ Σ_σ c_σ·exp(q̄_i·k̄_σ·scale)) instead of key-block means;
- ``oracle``: the cheapest single layer-wide setting of either mode (fine grid, both kinds of pseudo-keys) whose
  errors on the held-out samples themselves meet the budget (every token measured, no margin).

Also: per variant the calibration time ratio (statistics collection of ``CalibrationStats.observe`` /
dense SDPA forward of the same q, k, v), the same ratio for each mode's grid alone (every call timed
``--timing-repeats`` times, the fastest counts; ``--timing-only`` measures this alone), and the
error-against-cost curves of single settings (all layers alike) on the held-out samples, plotted with the
variants' profiles (``--plot``).

Examples:
    python benchmarks/bench_levers.py --threads 2                 # ~2-4 minutes on 2 CPU cores
    python benchmarks/bench_levers.py --threads 2 --timing-only   # the calibration time alone, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from workload_study import add_workload_args, set_threads, workload_model  # noqa: E402
from isa_plugin.calibration import heldout  # noqa: E402
from isa_plugin.calibration.cost import DEFAULT_COST_MODEL  # noqa: E402
from isa_plugin.calibration.fit import fit_profile  # noqa: E402
from isa_plugin.calibration.solver import layer_errors  # noqa: E402
from isa_plugin.calibration.statistics import CalibrationStats, Grid  # noqa: E402
from isa_plugin.calibration.synthetic import evaluate_synthetic  # noqa: E402
from isa_plugin.kernels.reference import pool_blocks  # noqa: E402
from isa_plugin.selection import get_mode  # noqa: E402
from isa_plugin.selection.adaptive import ADAPTIVE_MASS  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "2026-12-05-cpu-levers")
#: the adaptive grid's masses before the fine grid
FORMER_MASS = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: the fine grid before k-means pseudo-keys were adopted (48 masses, 0.3 … 0.995)
FINE48_MASS = tuple(round(1.0 - 0.7 * 0.9**i, 4) for i in range(48))
#: tokens per key sub-block of the sub-block mass estimate (lever b)
SUBBLOCK = 16


@contextlib.contextmanager
def margin_bisections(n):
    old = heldout.MARGIN_BISECTIONS
    heldout.MARGIN_BISECTIONS = n
    try:
        yield
    finally:
        heldout.MARGIN_BISECTIONS = old


@contextlib.contextmanager
def subblock_mass(model):
    """Lever (b): the adaptive planner ranks and thresholds key blocks by the mass of their 16-token key
    sub-blocks, m_ij ∝ Σ_σ c_σ·exp(q̄_i·k̄_σ·scale). The keys reach the planner through ``model.sample``
    (the last sample drawn is the call being planned, in calibration and in evaluation alike)."""
    from isa_plugin.layout import TEXT
    from isa_plugin.selection.adaptive import _Order

    mode = get_mode("adaptive")
    order = mode.order
    sample = model.sample
    last = {}

    def drawn(*args, **kw):
        out = sample(*args, **kw)
        last["k"] = out[1]
        return out

    def patched(qbar, kbar, blocks, alpha_s, scale):
        o = order(qbar, kbar, blocks, alpha_s, scale)
        k = last["k"]
        sub, parent = blocks.split(SUBBLOCK)
        parent = parent.to(qbar.device)
        ksub = pool_blocks(k, sub.to(k.device)).mean(0, keepdim=True).to(qbar.dtype)  # [1, H, n_sub, D]
        raw = torch.einsum("bhid,bhsd->bhis", qbar, ksub) * scale + torch.log(sub.counts.to(qbar.dtype))
        B, H, nb, _ = qbar.shape
        idx = parent.expand(B, H, nb, -1)
        mx = torch.full((B, H, nb, nb), float("-inf"), dtype=raw.dtype).scatter_reduce(-1, idx, raw, "amax")
        total = torch.zeros(B, H, nb, nb, dtype=raw.dtype).scatter_add(-1, idx, torch.exp(raw - mx.gather(-1, idx)))
        logits = mx + torch.log(total)  # log Σ_σ c_σ exp(q̄·k̄_σ·scale) per key block
        is_x = blocks.kinds == TEXT
        m = torch.softmax(logits.masked_fill(~o.kv_keep[:, :, None, :], float("-inf")), -1)
        text_mass = (m * is_x).sum(-1)
        cand = (o.kv_keep & ~is_x)[:, :, None, :].expand(B, H, nb, nb)
        srt = torch.sort(m.masked_fill(~cand, -1.0), dim=-1, descending=True, stable=True).indices
        m_sorted = torch.gather(m, -1, srt).masked_fill(~torch.gather(cand, -1, srt), 0.0)
        prefix = torch.cumsum(m_sorted, -1)
        prefix = torch.cat([torch.zeros_like(prefix[..., :1]), prefix[..., :-1]], -1)
        reached = torch.cummax(torch.nan_to_num(text_mass[..., None] + prefix, nan=float("inf")), -1).values
        return _Order(o.kv_keep, o.saliency, m, srt, reached, o.k_prime, is_x)

    mode.order, model.sample = patched, drawn
    try:
        yield
    finally:
        del mode.order, model.sample


def calibrate(model, samples, grid, a, timing):
    """CalibrationStats of ``model`` over ``samples``; adds observe() seconds and dense SDPA seconds to ``timing``."""
    stats = CalibrationStats(grid, blocks_per_kind=a.blocks_per_kind, tokens_per_block=a.tokens_per_block)
    for s in samples:
        for layer, name in enumerate(model.layer_names):
            q, k, v, layout = model.sample(layer, s)
            t = time.perf_counter()
            stats.observe(name, q, k, v, layout, sample=s)
            timing["observe"] = timing.get("observe", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            timing["dense"] = timing.get("dense", 0.0) + time.perf_counter() - t
    return stats


def curves(model, stats, budget):
    """Error-against-cost of single settings applied to every layer, from full held-out statistics:
    {curve name: [(mean cost, worst error t, worst error c), ...]}."""
    out = {}
    names = model.layer_names
    for mode_name, g in stats.grid.modes.items():
        mode = get_mode(mode_name)
        per_layer = []
        for name in names:
            ls = stats.get(name)
            table = mode.candidates(ls.modes[mode_name], g, ls, DEFAULT_COST_MODEL)
            err = layer_errors(table)
            cost = table.cost.sum(0) if table.cost.ndim == 2 else ls.heads * table.cost
            n = sum(ls.mean_tokens().values())
            per_layer.append((err, cost / DEFAULT_COST_MODEL.dense_time(n, ls.heads, ls.head_dim)))
        if mode_name == "adaptive":  # mass = context_mass, alpha_s = 1, each pseudo-key variant
            S, P, PS = g.shape
            si = g.alpha_s.index(1.0)
            for qi, (ps, kind) in enumerate(g.pseudo_variants):
                idx = [((si * P + p) * P + p) * PS + qi for p in range(P)]
                out[f"adaptive s={ps} {kind}"] = [(sum(float(c[i]) for _, c in per_layer) / len(names),
                                            max(float(e[0, i]) for e, _ in per_layer), max(float(e[1, i]) for e, _ in per_layer))
                                           for i in idx]
        else:  # fixed: alpha_s = 1, each alpha_ns, alpha_f swept (topk_mass)
            cands = list(g.candidates())
            for ns in g.alpha_ns:
                idx = [i for i, c in enumerate(cands) if c.get("alpha_s") == 1.0 and c.get("alpha_ns") == ns
                       and c.get("sharpness", "topk_mass") == "topk_mass"]
                if idx:
                    out[f"fixed α_ns={ns:g}"] = [(sum(float(c[i]) for _, c in per_layer) / len(names),
                                                  max(float(e[0, i]) for e, _ in per_layer), max(float(e[1, i]) for e, _ in per_layer))
                                                 for i in idx]
    return out


def summarise(held):
    c = [x["relative_cost"] for x in held.values()]
    return {"cost": sum(c) / len(c), "worst_t": max(x["error_target"] for x in held.values()),
            "worst_c": max(x["error_context"] for x in held.values()), "layers": held}


def calibration_time(model, a):
    """Seconds of statistics collection (``CalibrationStats.observe``) and of dense SDPA for each mode's grid alone
    (fixed: ``Grid()``; adaptive: its default grid alone): every call of the calibration samples is timed
    ``a.timing_repeats`` times, collection and dense alternately, and the fastest of each counts (a shared
    machine's load only adds time)."""
    out = {}
    for mname, grid in (("fixed alone", Grid()), ("adaptive alone", Grid(["adaptive"], mass=ADAPTIVE_MASS))):
        stats = CalibrationStats(grid, blocks_per_kind=a.blocks_per_kind, tokens_per_block=a.tokens_per_block)
        timing = {"observe": 0.0, "dense": 0.0}
        for s in a.samples:
            for layer, name in enumerate(model.layer_names):
                q, k, v, layout = model.sample(layer, s)
                best = {"observe": float("inf"), "dense": float("inf")}
                for _ in range(a.timing_repeats):
                    t = time.perf_counter()
                    stats.observe(name, q, k, v, layout, sample=s)
                    best["observe"] = min(best["observe"], time.perf_counter() - t)
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                    best["dense"] = min(best["dense"], time.perf_counter() - t)
                for key in timing:
                    timing[key] += best[key]
        out[mname] = timing
    return out


def run_workload(name, a):
    model = workload_model(name, a)
    spec = model.spec
    res = {"workload": name, "tokens": 2 * spec.tokens_per_video, "variants": {}}
    if a.timing_only:
        res["timing"] = calibration_time(model, a)
        return res
    mean = ("mean",)
    variants = [("fixed", Grid(), a.bisections, False), ("former", Grid(mass=FORMER_MASS, pseudo_keys=mean), 0, False),
                ("fine+bisect", Grid(mass=FINE48_MASS, pseudo_keys=mean), a.bisections, False),
                ("fine+bisect+kmeans", Grid(mass=FINE48_MASS), a.bisections, False),
                ("kmeans+low masses", Grid(mass=ADAPTIVE_MASS), a.bisections, False)]
    if a.with_both:
        variants.append(("kmeans+low masses+mean", Grid(mass=ADAPTIVE_MASS, pseudo_keys=("mean", "kmeans")), a.bisections, False))
    if a.with_fine:
        variants.insert(2, ("fine", Grid(mass=FINE48_MASS, pseudo_keys=mean), 0, False))
    if not a.skip_subblock:
        variants.append(("subblock-mass", Grid(mass=ADAPTIVE_MASS, pseudo_keys=mean), a.bisections, True))
    stats_cache = {}
    for vname, grid, bis, sub in variants:
        key = (repr(grid), sub)
        timing = {}
        t = time.perf_counter()
        with (subblock_mass(model) if sub else contextlib.nullcontext()):
            if key not in stats_cache:
                stats_cache[key] = (calibrate(model, a.samples, grid, a, timing), timing)
            stats, timing = stats_cache[key]
            t_cal = time.perf_counter() - t
            with margin_bisections(bis):
                t = time.perf_counter()
                profile = fit_profile(stats, a.budget)
                t_fit = time.perf_counter() - t
            held = evaluate_synthetic(model, profile, a.held_out)
        modes = {n: (profile.config_for(n).mode if profile.config_for(n) is not None else "dense") for n in model.layer_names}
        res["variants"][vname] = dict(summarise(held), modes=modes, margins=[profile.calibrated_on["held_out"][n][0]["margin"]
                                                                             for n in model.layer_names],
                                      observe_s=timing["observe"], dense_s=timing["dense"], calibrate_s=t_cal, fit_s=t_fit)
        print(f"{name} {vname}: cost {res['variants'][vname]['cost']:.3f}, worst t/c {res['variants'][vname]['worst_t']:.3f}/"
              f"{res['variants'][vname]['worst_c']:.3f}, observe/dense {timing['observe'] / timing['dense']:.2f}", flush=True)
    res["timing"] = calibration_time(model, a)
    # the oracle: every token of the held-out samples measured, the best single layer-wide setting per layer
    full = argparse.Namespace(**dict(vars(a), blocks_per_kind=1 << 20, tokens_per_block=1 << 20))
    ho_stats = calibrate(model, a.held_out, Grid(mass=ADAPTIVE_MASS, pseudo_keys=("mean", "kmeans")), full, {})
    oracle = fit_profile(ho_stats, a.budget, per_head=False, margin=1.0, held_out=False)
    res["variants"]["oracle"] = dict(summarise(evaluate_synthetic(model, oracle, a.held_out)),
                                     modes={n: (oracle.config_for(n).mode if oracle.config_for(n) is not None else "dense")
                                            for n in model.layer_names})
    print(f"{name} oracle: cost {res['variants']['oracle']['cost']:.3f}", flush=True)
    res["curves"] = curves(model, ho_stats, a.budget)
    return res


def table(results, budget):
    lines = []
    if any(r["variants"] for r in results):
        lines += ["| workload | variant | cost (pairs / N²) | × former | × oracle | worst held-out err t/c | modes per layer | "
                  "margins | observe / dense SDPA |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            v = r["variants"]
            for name, x in v.items():
                ratio = f"{x['observe_s'] / x['dense_s']:.1f}" if "observe_s" in x else ""
                marg = ", ".join(f"{m:.2f}" for m in x.get("margins", []))
                lines.append(f"| {r['workload']} | {name} | {x['cost']:.3f} | {x['cost'] / v['former']['cost']:.2f} | "
                             f"{x['cost'] / v['oracle']['cost']:.2f} | {x['worst_t']:.3f}/{x['worst_c']:.3f} | "
                             f"{', '.join(x['modes'].values())} | {marg} | {ratio} |")
        lines.append("")
    lines += ["Calibration time (statistics collection / dense SDPA forward of the same q, k, v; each mode's grid alone; "
              "in brackets: seconds of collection, of dense SDPA):", "", "| workload | fixed | adaptive |", "|---|---|---|"]
    for r in results:
        t = r["timing"]
        lines.append("| " + " | ".join([r["workload"]] + [f"{x['observe'] / x['dense']:.2f} ({x['observe']:.2f} s, {x['dense']:.2f} s)"
                                                         for x in (t["fixed alone"], t["adaptive alone"])]) + " |")
    return "\n".join(lines)


def plot(results, path, budget):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for cname, pts in r["curves"].items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [max(p[1], p[2]) for p in pts], "-", lw=1, alpha=0.6,
                    label=f"single setting: {cname}")
        for vname, x in r["variants"].items():
            ax.plot([x["cost"]], [max(x["worst_t"], x["worst_c"])], "o", ms=8, label=f"profile: {vname}")
        ax.axhline(budget, color="k", ls=":", lw=1)
        ax.axhline(1.1 * budget, color="r", ls=":", lw=1)
        ax.set_xlabel("FLOPs (pairs / N²), held-out samples")
        ax.set_ylabel("worst relative L1 error (layers, target/context)")
        ax.set_ylim(0, 4 * budget)
        ax.set_xlim(0, 1)
        ax.set_title(f"{r['workload']} (N = {r['tokens']})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--bisections", type=int, default=heldout.MARGIN_BISECTIONS)
    ap.add_argument("--skip-subblock", action="store_true", help="leave out the lever (b) study")
    ap.add_argument("--with-fine", action="store_true", help="also the fine grid without the margin bisection")
    ap.add_argument("--with-both", action="store_true", help="also the package's grid with sub-block means offered beside k-means")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--plot", action="store_true", help="write levers_<shape>.png")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the calibration time of each mode alone (no variants, fits or held-out evaluation)")
    ap.add_argument("--timing-repeats", type=int, default=3,
                    help="times each call's collection and dense SDPA are timed for the calibration time (the fastest counts)")
    a = ap.parse_args(argv)
    set_threads(a)
    t0 = time.perf_counter()
    results = [run_workload(n, a) for n in a.workloads]
    total = time.perf_counter() - t0
    cmd = "python benchmarks/bench_levers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"`{cmd.strip()}` (torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
            f"{datetime.date.today().isoformat()}, {total:.0f} s)")
    md = table(results, a.budget)
    print(head)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, ("caltime" if a.timing_only else "levers") + f"_{a.frames}x{a.height}x{a.width}"
                        + (f"_seed{a.seed}" if a.seed else ""))
    with open(stem + ".md", "w") as f:
        f.write(head + "\n\n" + md + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": total,
                   "args": vars(a), "results": results}, f, indent=1)
    if a.plot:
        plot(results, stem + ".png", a.budget)


if __name__ == "__main__":
    main()
