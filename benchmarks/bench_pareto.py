"""Error against cost for ISA's two selection modes (fixed ratios, adaptive) on the synthetic ICL workload.

Two studies:

``--flops`` (any device, CPU is fine: FLOPs do not depend on the device)
    On a :class:`~isa_plugin.calibration.synthetic.SyntheticModel` (default: the package's default spec),
    measure every layer with the calibration's own estimator
    (:class:`~isa_plugin.calibration.statistics.CalibrationStats` over a
    :class:`~isa_plugin.calibration.statistics.Grid` holding this benchmark's candidates of both modes,
    :data:`FIXED_GRID` and :data:`ADAPTIVE_GRID`) on *calibration* samples (each observed with
    ``sample=i``). Every query block and every token is sampled, so the estimate is the exact relative L1
    error of target-query and context-query outputs against dense attention. Per layer the calibration's
    fit (:func:`isa_plugin.calibration.fit.fit_layer`, pair-count cost model) picks the cheapest setting
    whose errors stay within ``margin × budget`` (layer-wide, and per head by its Lagrangian search,
    keeping the cheaper unless ``--min-gain``), once per mode (a grid holding only that mode) and once with
    both modes offered. Those choices are then evaluated on *held-out* samples: their errors by
    :func:`isa_plugin.calibration.heldout.setting_errors` on statistics measured the same way (every token)
    from the held-out samples, their relative FLOPs as (exact + pseudo pairs) / N² of the plan each chosen
    setting makes on every held-out sample (:func:`isa_plugin.executors.reference.plan_reference`,
    :meth:`BlockPlan.pair_counts <isa_plugin.plan.BlockPlan.pair_counts>`; dense layers count 1). The
    fit's own prediction on the calibration samples (its ``relative_cost`` under the pair-count model) is
    reported beside them. The adaptive mode's candidates include a context-query mass of its own
    (``context_mass``), as the calibration's adaptive mode does. ``--check`` first compares the estimator
    with the reference executor on a small model.

default (GPU timing; ``--tiny`` runs the same code on CPU at a tiny size)
    At N = 65,536 and 65,520 (131,072 on request), H = 40, D = 128, bf16: time (``triton.testing.do_bench``,
    median) the fixed mode (``isa_attention``, Triton executor) and the adaptive mode on each executor of
    ``--adaptive-executors`` (default the block-sparse executor ``sparse``; ``flex``: FlexAttention; rows
    labelled ``adaptive/<executor>``) over their settings, the whole call including planning (and the
    planning half alone: ``Executor.plan``), and cuDNN dense attention; the error of each output against cuDNN's
    dense output on a held-out synthetic sample. Each output is first checked against the reference
    semantics of its own plan on sampled rows (FlashAttention's rule); a failing check gets no time.
    Prints a table, the two Pareto fronts (time vs max(target, context) error), the fastest setting of
    each mode within the budget, and writes a PNG.

Examples:
    python benchmarks/bench_pareto.py --flops                       # CPU, minutes
    python benchmarks/bench_pareto.py --flops --frames 2 --height 8 --width 8 --layers 2   # CPU, seconds
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

from isa_plugin.calibration.cost import DEFAULT_COST_MODEL  # noqa: E402
from isa_plugin.calibration.fit import fit_layer, parse_budget  # noqa: E402
from isa_plugin.calibration.heldout import setting_errors  # noqa: E402
from isa_plugin.calibration.statistics import CalibrationStats, Grid  # noqa: E402
from isa_plugin.calibration.synthetic import SyntheticModel, SyntheticSpec, synthetic_qkv  # noqa: E402
from isa_plugin.config import ISAConfig  # noqa: E402
from isa_plugin.executors.reference import isa_attention_reference, plan_reference  # noqa: E402
from isa_plugin.kernels.reference import dense_attention_reference  # noqa: E402
from isa_plugin.layer_setting import LayerSetting  # noqa: E402
from isa_plugin.layout import CONTEXT, TARGET  # noqa: E402
from isa_plugin.selection.adaptive import AdaptiveGrid  # noqa: E402
from isa_plugin.selection.fixed import FixedGrid  # noqa: E402

#: the FLOP study's candidates of the fixed mode (every combination; ``metrics``: the sharpness metrics)
FIXED_GRID = dict(alpha_s=(0.25, 0.5, 1.0), alpha_f=(0.125, 0.25, 0.5, 0.75, 1.0), alpha_ns=(0.03125, 0.0625, 0.125, 0.25),
                  metrics=("topk_mass", "l2"))
#: ... and of the adaptive mode (the fit also pairs every ``mass`` with every context-query mass)
ADAPTIVE_GRID = dict(mass=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99), pseudo_block=(64, 16),
                     alpha_s=(0.25, 0.5, 1.0))
#: the FLOP study's columns: the modes each one offers the fit
STUDY_MODES = {"fixed": ("fixed",), "adaptive": ("adaptive",), "both": ("fixed", "adaptive")}


def study_grid(block_size: int = 64) -> Grid:
    """The calibration grid of the FLOP study: both modes with this benchmark's candidates (pseudo-key sizes
    larger than the block size become the block size)."""
    ps = tuple(sorted({min(s, block_size) for s in ADAPTIVE_GRID["pseudo_block"]}))
    return Grid({"fixed": FixedGrid(**FIXED_GRID), "adaptive": AdaptiveGrid(**dict(ADAPTIVE_GRID, pseudo_block=ps))})


def describe(cfg: ISAConfig) -> str:
    """One line naming a config's mode and settings."""
    if cfg.mode == "fixed":
        return f"fixed a_s={cfg.alpha_s} a_f={cfg.alpha_f} a_ns={cfg.alpha_ns} {cfg.sharpness} b={cfg.block_size}"
    ctx = "" if cfg.context_mass is None else f"/{cfg.context_mass}"
    kind = " kmeans" if cfg.pseudo_keys == "kmeans" else ""
    return f"adaptive p={cfg.mass}{ctx} s={cfg.pseudo_block}{kind} a_s={cfg.alpha_s} b={cfg.block_size}"


def describe_setting(setting: LayerSetting, block_size: int) -> str:
    return "dense" if setting.dense else describe(setting.to_config(block_size=block_size))


# ============================================================================ FLOP study (device-independent)
def measure_stats(model: SyntheticModel, seeds, grid: Grid, block_size: int, dtype=torch.float32, log=None) -> CalibrationStats:
    """Calibration statistics of every layer of ``model`` over ``seeds`` (each observed as its own sample),
    with every query block and every token sampled: the estimator's errors are then exact."""
    nb = model.spec.layout().num_blocks(block_size)
    stats = CalibrationStats(grid, block_size=block_size, blocks_per_kind=nb, tokens_per_block=block_size)
    for seed in seeds:
        for layer, name in enumerate(model.layer_names):
            q, k, v, layout = model.sample(layer, seed, dtype=dtype)
            stats.observe(name, q, k, v, layout, sample=seed)
        if log:
            log(f"  sample {seed}: {len(model.layer_names)} layers measured")
    return stats


def held_out_flops(model: SyntheticModel, layer: int, seeds, setting: LayerSetting, block_size: int) -> float:
    """Mean (exact + pseudo pairs) / (N²·H) of the plans ``setting`` makes on the held-out samples (1 when dense)."""
    if setting.dense:
        return 1.0
    cfg = setting.to_config(block_size=block_size, backend="reference")
    costs = []
    for seed in seeds:
        q, k, _, layout = model.sample(layer, seed)
        costs.append(plan_reference(q, k, layout, cfg).relative_cost())
    return sum(costs) / len(costs)


def check_estimator(block_size: int = 64) -> float:
    """Largest |estimated − exact| relative L1 error (float64) of a few settings of both modes on a small model:
    the calibration estimator with every token sampled against the reference executor's output."""
    small = SyntheticModel(SyntheticSpec(frames=2, height=8, width=16, heads=2, head_dim=32, layers=1), seed=1)
    grid = study_grid(block_size)
    stats = measure_stats(small, [0], grid, block_size, dtype=torch.float64)
    ls = stats.get(small.layer_names[0])
    q, k, v, layout = small.sample(0, 0, dtype=torch.float64)
    dense = dense_attention_reference(q, k, v)
    blocks = layout.blocks(block_size)
    kinds = blocks.kinds[blocks.token_block]
    ps_small = min(ADAPTIVE_GRID["pseudo_block"] + (block_size,))
    settings = [
        LayerSetting(alpha_s=0.25, alpha_f=0.25, alpha_ns=0.0625, sharpness="topk_mass"),
        LayerSetting(alpha_s=0.5, alpha_f=0.75, alpha_ns=0.125, sharpness="l2"),
        LayerSetting(alpha_s=(0.5, 1.0), alpha_f=(0.125, 0.5), alpha_ns=0.03125),
        LayerSetting(mode="adaptive", mass=0.8, pseudo_block=ps_small, alpha_s=0.5),
        LayerSetting(mode="adaptive", mass=0.9, context_mass=0.7, pseudo_block=block_size, alpha_s=1.0),
        LayerSetting(mode="adaptive", mass=(0.6, 0.95), pseudo_block=block_size, alpha_s=0.25),
    ]
    worst = 0.0
    for s in settings:
        out = isa_attention_reference(q, k, v, layout, s.to_config(block_size=block_size, backend="reference"))
        est = setting_errors(ls, grid, s)
        for kid, kk in enumerate((TARGET, CONTEXT)):
            sel = kinds == kk
            exact = float((out - dense)[0, sel].abs().sum() / dense[0, sel].abs().sum())
            worst = max(worst, abs(est[kid] - exact))
    return worst


def flops_study(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = args.study_block_size
    spec = SyntheticSpec(frames=args.frames, height=args.height, width=args.width, heads=args.study_heads,
                         head_dim=args.study_dim, layers=args.layers)
    model = SyntheticModel(spec, seed=args.model_seed)
    grid = study_grid(bs)
    budget = parse_budget(args.budget)
    log = (lambda s: print(s, flush=True)) if args.verbose else None
    if args.check:
        worst = check_estimator(bs)
        print(f"calibration estimator (every token sampled) vs reference executor (float64): max |error difference| "
              f"{worst:.2e}", flush=True)
        if worst > 1e-9:
            raise SystemExit("estimator check failed")
    N = spec.layout().num_tokens
    n_fixed = len(list(grid.modes["fixed"].candidates()))
    S, P, PS = grid.modes["adaptive"].shape
    print(f"FLOP study: N={N} H={spec.heads} D={spec.head_dim} layers={spec.layers} block_size={bs} budget={args.budget} "
          f"margin={args.margin}; calibration samples {args.calib_seeds}, held-out {args.held_seeds}; {n_fixed} fixed "
          f"and {S * P * PS} adaptive settings ({S * P * P * PS} with a context mass of their own); fit: pair-count cost "
          f"model, per head {args.per_head}, min gain {args.min_gain}", flush=True)
    t0 = time.time()
    calib = measure_stats(model, args.calib_seeds, grid, bs, log=log)
    held = measure_stats(model, args.held_seeds, grid, bs, log=log)
    print(f"statistics measured [{time.time() - t0:.0f}s]", flush=True)
    per_head = {"auto": "auto", "always": "always", "off": False}[args.per_head]
    rows = []
    for layer, name in enumerate(model.layer_names):
        ls, hs = calib.get(name), held.get(name)
        res = {}
        for label, modes in STUDY_MODES.items():
            g = Grid({m: grid.modes[m] for m in modes})
            setting = fit_layer(ls, g, budget, DEFAULT_COST_MODEL, per_head, args.margin, args.min_gain)
            et, ec = setting_errors(hs, grid, setting)
            flops = held_out_flops(model, layer, args.held_seeds, setting, bs)
            res[label] = dict(err_t=et, err_c=ec, flops=flops, flops_calib=1.0 if setting.dense else setting.relative_cost,
                              err_t_calib=setting.error_target or 0.0, err_c_calib=setting.error_context or 0.0,
                              mode=setting.mode or "dense", settings=[describe_setting(setting, bs)],
                              setting=None if setting.dense else setting.to_config(block_size=bs).to_dict())
            r = res[label]
            print(f"layer {layer} {label:8s}: held-out FLOPs {flops:.3f} err t/c {et:.4f}/{ec:.4f} (calibration "
                  f"{r['flops_calib']:.3f}, {r['err_t_calib']:.4f}/{r['err_c_calib']:.4f}); {r['settings'][0]} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
        rows.append(res)
    modes = tuple(STUDY_MODES)
    tot = {m: sum(r[m]["flops"] for r in rows) / len(rows) for m in modes}
    lines = ["| layer | fixed FLOPs | fixed err t/c | adaptive FLOPs | adaptive err t/c | both FLOPs | both err t/c | both: mode |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(f"{r[m]['flops']:.3f} | {r[m]['err_t']:.4f}/{r[m]['err_c']:.4f}" for m in modes)
                     + f" | {r['both']['mode']} |")
    lines.append(f"| mean | {tot['fixed']:.3f} | | {tot['adaptive']:.3f} | | {tot['both']:.3f} | | |")
    table = "\n".join(lines)
    print(table)
    ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
    print(f"FLOP ratio at budget {args.budget} (held-out): adaptive / fixed = {ratio(tot['adaptive'], tot['fixed']):.3f}, "
          f"both modes offered / fixed = {ratio(tot['both'], tot['fixed']):.3f}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pareto_flops.json"), "w") as f:
            json.dump(dict(spec=spec.__dict__, block_size=bs, budget=args.budget, margin=args.margin, per_head=args.per_head,
                           min_gain=args.min_gain, grid=grid.to_dict(), calib=args.calib_seeds, held=args.held_seeds,
                           flops_definition="flops: (exact + pseudo pairs) / (N^2 H) of the chosen setting's plans on the "
                                            "held-out samples (BlockPlan.pair_counts); flops_calib: the fit's relative_cost "
                                            "(pair-count cost model, calibration samples)", rows=rows, mean=tot,
                           torch=torch.__version__), f, indent=1, default=str)
        with open(os.path.join(args.out, "pareto_flops.md"), "w") as f:
            f.write(table + "\n")
    return rows, tot


# ============================================================================ GPU timing study
SHAPES = {131072: (16, 64, 64), 65536: (8, 64, 64), 65520: (21, 30, 52), 32768: (8, 32, 64), 512: (2, 8, 16), 1040: (2, 10, 26)}


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


def flex_plan(q, k, v, layout, config, scale):
    """The planning half of :func:`~isa_plugin.executors.flex.flex_attention_call`: pad and pool, plan with the
    config's mode, build the FlexAttention inputs (block mask, score_mod)."""
    from isa_plugin.kernels.flex import build_flex_inputs, flex_prepare
    from isa_plugin.selection import plan_from_pooled

    blocks = layout.blocks(config.block_size).to(q.device)
    prepared = flex_prepare(q, k, v, blocks, config.pseudo_block_size, config.pseudo_keys)
    plan = plan_from_pooled(config.selection, prepared.qbar, prepared.kbar, blocks, config.settings, scale, config.share_plan)
    return build_flex_inputs(q, k, v, plan, prepared)


def timing_study(args):
    from isa_plugin.attention import isa_attention
    from isa_plugin.execution import get_executor

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
    fixed = [dict(alpha_s=s, alpha_f=f, alpha_ns=n) for s in (0.25, 0.5, 1.0) for f in (0.25, 0.5, 0.75, 1.0) for n in (0.0625, 0.125)]
    adaptive = [ISAConfig(mode="adaptive", mass=p, pseudo_block=ps, pseudo_keys=kind, alpha_s=s, block_size=bs, backend=ex)
                for ex in (args.adaptive_executors if cuda else ["reference"])
                for bs, pss in ((128, (128, 32, 16)), (64, (64, 16))) if bs in args.adaptive_block_sizes
                for ps in pss if args.adaptive_pseudo_blocks is None or ps in args.adaptive_pseudo_blocks
                for kind in (args.adaptive_pseudo_keys if ps < bs else ["mean"])
                for s in args.adaptive_alpha_s for p in args.adaptive_masses]
    fixed = fixed if "fixed" in args.modes else []
    adaptive = adaptive if "adaptive" in args.modes else []
    if args.quick or args.tiny:  # thin long lists (a list of a few settings given on the command line stays whole)
        fixed = fixed[::5]
        adaptive = adaptive[::7] if len(adaptive) > 7 else adaptive
    if args.no_fixed_grid:
        fixed = []
    if args.fixed_defaults:  # the fixed mode's default ratios (b = 64)
        fixed = [{}] + fixed
    fixed = [ISAConfig(backend=ex, **r) for r in fixed for ex in (args.fixed_executors if cuda else ["auto"])]
    rows = []
    for N in ns:
        f, hh, ww = SHAPES[N]
        q, k, v, layout = synthetic_qkv(f, hh, ww, H, head_dim=D, layer_depth=0.5, sample_seed=1000, device=dev, dtype=dtype,
                                        workload=args.workload)
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
        rows.append(dict(N=N, H=H, mode="dense", setting="cuDNN SDPA" if cuda else "torch", ms=t_dense, err_t=0.0, err_c=0.0,
                         flops_rel=1.0, ok=True))
        scale = 1.0 / math.sqrt(D)
        for st in fixed + adaptive:
            row = dict(N=N, mode=f"{st.mode}/{st.backend}" if st.backend != "auto" else st.mode, setting=describe(st))
            try:
                if st.mode == "fixed" and st.backend in ("triton", "auto"):
                    # the Triton executor on CUDA (raises when it cannot serve the call), the reference on the CPU
                    cfg = st
                    out = isa_attention(q, k, v, layout, cfg)
                    if cuda:
                        from isa_plugin.kernels.compact import compact_to_block_plan
                        from isa_plugin.selection.fixed_gpu import plan_compact

                        cp = plan_compact(q, k, layout, cfg, v=v)
                        e, a = cp.pair_counts()
                        plan = compact_to_block_plan(cp)
                    else:
                        plan = plan_reference(q, k, layout, cfg)
                        e, a = plan.pair_counts()
                    fn = lambda: isa_attention(q, k, v, layout, cfg)  # noqa: E731
                    plan_fn = (lambda: plan_compact(q, k, layout, cfg, v=v)) if cuda else (lambda: plan_reference(q, k, layout, cfg))  # noqa: E731
                else:
                    cfg, ex = st, get_executor(st.backend)
                    plan = ex.plan(q, k, v, layout, cfg, scale)
                    out = ex.execute(q, k, v, layout, cfg, scale, plan)
                    e, a = plan.pair_counts()
                    fn = lambda: ex.run(q, k, v, layout, cfg, scale)  # noqa: E731
                    plan_fn = (lambda: flex_plan(q, k, v, layout, cfg, scale)) if st.backend == "flex" else (  # noqa: E731
                        lambda: ex.plan(q, k, v, layout, cfg, scale))
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
    if args.executor_costs and cuda:
        fit_executor_costs(rows, gpu, args.executor_costs)
    return rows


def fit_time(rs):
    """Least squares ms = a·E + b·A + c over rows (E, A: exact / pseudo pairs in 1e9, scaled by D/128; weighted by
    1/ms, coefficients clamped at 0): (a, b, c, largest relative error of the fit)."""
    A = torch.tensor([[r["exact_pairs"] / 1e9 * r["D"] / 128, r["pseudo_pairs"] / 1e9 * r["D"] / 128, 1.0] for r in rs],
                     dtype=torch.float64)
    y = torch.tensor([r["ms"] for r in rs], dtype=torch.float64)
    w = 1.0 / y
    sol = torch.linalg.lstsq(A * w[:, None], (y * w).unsqueeze(1)).solution.squeeze(1)
    a, b, c = (max(float(x), 0.0) for x in sol)
    pred = A @ torch.tensor([a, b, c], dtype=torch.float64)
    return a, b, c, float(((pred - y).abs() / y).max())


def _merge_card(path, gpu, update):
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    update(data.setdefault("cards", {}).setdefault(gpu, {}))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def fit_adaptive_cost(rows, gpu, path):
    """Fit the adaptive rows (:func:`fit_time`) and merge ``adaptive_ms_per_gexact_pair``, ``adaptive_ms_per_gpseudo_pair``
    and ``adaptive_ms_per_call`` into the card's entry of ``path`` (the calibration's cost model reads them)."""
    rs = [r for r in rows if r["mode"] == "adaptive/sparse" and "ms" in r] or [r for r in rows if r["mode"].startswith("adaptive") and "ms" in r]
    if len(rs) < 3:
        print("adaptive cost model: need at least 3 measured settings", flush=True)
        return
    a, b, c, rel = fit_time(rs)
    _merge_card(path, gpu, lambda card: card.update(adaptive_ms_per_gexact_pair=a, adaptive_ms_per_gpseudo_pair=b, adaptive_ms_per_call=c,
                                                    adaptive_fitted_on=len(rs), adaptive_max_rel_error=rel))
    print(f"adaptive cost model for {gpu}: a={a:.4f} b={b:.4f} c={c:.3f} ms (max rel err {rel:.2f}) -> {path}", flush=True)


def fit_executor_costs(rows, gpu, path):
    """Fit each executor's time over every measured row it ran (both modes; :func:`fit_time`) and merge the card's
    ``executors`` entry of ``path``: the coefficients :mod:`isa_plugin.dispatch` ranks executors by. Also prints,
    per fixed setting measured on several executors, which one was faster and which one the fit predicts."""
    by_ex = {}
    for r in rows:
        if "ms" in r and "/" in r["mode"]:
            by_ex.setdefault(r["mode"].split("/", 1)[1], []).append(r)
    fits = {}
    for ex, rs in sorted(by_ex.items()):
        if len(rs) < 3:
            print(f"executor cost model: {ex} has {len(rs)} measured settings (needs 3); not fitted", flush=True)
            continue
        a, b, c, rel = fit_time(rs)
        fits[ex] = dict(ms_per_gexact_pair=a, ms_per_gpseudo_pair=b, ms_per_call=c, fitted_on=len(rs), max_rel_error=rel)
        print(f"executor {ex} on {gpu}: {a:.4f} ms/G exact, {b:.4f} ms/G pseudo, {c:.3f} ms/call (max rel err {rel:.2f}, "
              f"{len(rs)} rows)", flush=True)
    if not fits:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    dense = [r for r in rows if r["mode"] == "dense" and "ms" in r]

    def update(card):
        card.setdefault("executors", {}).update({ex: dict(f, date=stamp, torch=torch.__version__) for ex, f in fits.items()})
        if dense and "dense_cudnn_ms_per_gpair" not in card:  # cuDNN's dense rate, the dense alternative of the fit
            card["dense_cudnn_ms_per_gpair"] = sum(r["ms"] / (r["N"] ** 2 * r["H"] / 1e9) for r in dense) / len(dense)

    _merge_card(path, gpu, update)
    agree = total = 0
    by_setting = {}
    for r in rows:
        if "ms" in r and r["mode"].startswith("fixed/"):
            by_setting.setdefault((r["N"], r["setting"]), {})[r["mode"].split("/", 1)[1]] = r
    for (N, setting), per in sorted(by_setting.items()):
        if len(per) < 2 or not all(ex in fits for ex in per):
            continue
        fastest = min(per, key=lambda ex: per[ex]["ms"])
        pred = {ex: fits[ex]["ms_per_gexact_pair"] * per[ex]["exact_pairs"] / 1e9 * per[ex]["D"] / 128
                + fits[ex]["ms_per_gpseudo_pair"] * per[ex]["pseudo_pairs"] / 1e9 * per[ex]["D"] / 128 + fits[ex]["ms_per_call"] for ex in per}
        chosen = min(pred, key=pred.get)
        total, agree = total + 1, agree + (chosen == fastest)
        print(f"  N={N} {setting}: " + ", ".join(f"{ex} {per[ex]['ms']:.2f} ms" for ex in per) + f"; fastest {fastest}, model picks {chosen}",
              flush=True)
    if total:
        print(f"dispatch by the fitted model picks the fastest executor for {agree} of {total} fixed settings", flush=True)


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
        modes = sorted({r["mode"] for r in rs if r["mode"] != "dense"})
        fronts = {m: pareto([r for r in rs if r["mode"] == m]) for m in modes}
        on_front = {id(r) for fr in fronts.values() for r in fr}
        for r in rs:
            if "ms" in r:
                lines.append(f"| {N} | {r['mode']} | {r['setting']} | {r['ms']:.2f} | {r.get('speedup', 1.0):.2f}× | "
                             f"{100 * r.get('plan_ms', 0) / r['ms']:.1f} | {r['flops_rel']:.3f} | {r.get('exact_tflops', float('nan')):.0f} | "
                             f"{r['err_t']:.4f} | {r['err_c']:.4f} | {'*' if id(r) in on_front else ''} |")
            else:
                lines.append(f"| {N} | {r['mode']} | {r['setting']} | – | – | – | – | – | – | – | {'FAIL' if 'note' not in r else 'ERROR'} |")
        best = {}
        for m in modes:
            okr = [r for r in rs if r["mode"] == m and "ms" in r and r["err_t"] <= args.budget and r["err_c"] <= args.budget]
            best[m] = min(okr, key=lambda r: r["ms"]) if okr else None
        s = f"N={N}: fastest within budget {args.budget}: " + "; ".join(
            f"{m} {best[m]['setting']} {best[m]['ms']:.2f} ms (FLOPs {best[m]['flops_rel']:.3f})" if best[m] else f"{m} none"
            for m in best)
        dense_ms = next(r["ms"] for r in rs if r["mode"] == "dense")
        s += "; over dense: " + ", ".join(f"{m} {dense_ms / b['ms']:.2f}×" for m, b in best.items() if b)
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
        modes = sorted({r["mode"] for r in rs if r["mode"] != "dense"})
        for m, c in zip(modes, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
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
    ap.add_argument("--check", action="store_true",
                    help="with --flops: first check the calibration estimator (every token sampled) against the reference executor")
    ap.add_argument("--tiny", action="store_true", help="timing study on CPU at tiny sizes (smoke run)")
    ap.add_argument("--quick", action="store_true", help="fewer settings in the timing study")
    ap.add_argument("--n", type=int, nargs="+", default=[65536, 65520], choices=sorted(SHAPES))
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["fixed", "adaptive"], choices=["fixed", "adaptive"],
                    help="timing study: modes to run (split long runs)")
    ap.add_argument("--adaptive-executors", nargs="+", default=["sparse"], choices=["sparse", "flex", "reference"],
                    help="executors the adaptive settings are timed on (GPU timing study)")
    ap.add_argument("--adaptive-pseudo-keys", nargs="+", default=["mean"], choices=["mean", "kmeans"],
                    help="pseudo-key kinds of the adaptive settings with several pseudo-keys per block (default: mean; "
                         "one pseudo-key per block is always the block mean)")
    ap.add_argument("--adaptive-pseudo-blocks", type=int, nargs="+", default=None,
                    help="only these pseudo-key sizes of the adaptive settings (default: 128, 32, 16 at b=128; 64, 16 at b=64)")
    ap.add_argument("--workload", default="structured", choices=["structured", "diffuse"],
                    help="synthetic workload of the timing study (isa_plugin.calibration.synthetic.WORKLOADS)")
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
    ap.add_argument("--study-block-size", type=int, default=64, help="FLOP study: ISA block size")
    ap.add_argument("--per-head", default="auto", choices=["auto", "always", "off"],
                    help="FLOP study: the fit's per-head settings (fit_profile's per_head; off: one setting per layer)")
    ap.add_argument("--min-gain", type=float, default=0.0,
                    help="FLOP study: relative cost cut per-head settings must bring over the best layer-wide one "
                    "(fit_profile's min_gain; default 0: keep the cheaper)")
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--held-seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for the FLOP study (0: torch's default)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the table (md), the rows (json) and the PNG")
    ap.add_argument("--fixed-executors", nargs="+", default=["triton"], choices=["triton", "sparse", "flex"],
                    help="timing study: executors the fixed settings run on")
    ap.add_argument("--fixed-defaults", action="store_true", help="timing study: add the fixed mode's default ratios")
    ap.add_argument("--no-fixed-grid", action="store_true", help="timing study: no fixed settings but the defaults (with --fixed-defaults)")
    ap.add_argument("--adaptive-masses", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--adaptive-alpha-s", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--executor-costs", default=None,
                    help="timing study on CUDA: fit every executor's time per exact / pseudo pair and merge it into this "
                         "JSON's card entry (isa_plugin/kernels/cost_model.json: what backend='auto' dispatches by)")
    ap.add_argument("--cost-model", default=None,
                    help="timing study on CUDA: fit the adaptive mode's time per exact / pseudo pair and merge it into this JSON")
    args = ap.parse_args(argv)
    if args.flops:
        return flops_study(args)
    return timing_study(args)


if __name__ == "__main__":
    main()
