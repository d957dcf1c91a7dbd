"""Benchmark: ISA (Triton kernels) vs torch SDPA (cuDNN and flash backends).

Shapes: B = 1, D = 128, bf16, target and context of equal length (N/2 each), q/k/v in diffusers'
[B, N, H, D] layout (SDPA gets the transposed views, as diffusers' processors pass them).

For every ISA setting it reports the median time (``triton.testing.do_bench``) of the whole call (pooling,
planning and attention), the planning share, the speed-up over cuDNN, the effective TFLOP/s (FLOPs
the plan actually computes: 4·D per exact (query, key) pair and per (query, pseudo-key) pair), and the
peak extra memory beyond q, k, v and the output in units of size(k). Each ISA output is first checked
against the reference semantics on a sample of query rows (same plan); a failing check prints FAIL and
no time. With ``--alpha-f-dense`` the α_f = 1 setting is also compared with cuDNN on a dense problem of
the same query and KV' sizes.

Examples:
    python benchmarks/bench_attention.py --n 65536 --heads 40                  # default ratios
    python benchmarks/bench_attention.py --n 16384 32768 65520 65536 131072 --heads 12 40
    python benchmarks/bench_attention.py --n 65536 --heads 40 --sweep --alpha-f-dense
    python benchmarks/bench_attention.py ... --record BENCHMARKS.md --cost-model isa_plugin/kernels/cost_model.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from isa_plugin.config import ISAConfig  # noqa: E402
from isa_plugin.layout import Layout  # noqa: E402
from isa_plugin.kernels.counts import keep_count  # noqa: E402
from isa_plugin.executors.triton import isa_attention_kernels  # noqa: E402
from isa_plugin.kernels.compact import compact_to_block_plan  # noqa: E402
from isa_plugin.selection.fixed_gpu import plan_compact  # noqa: E402
from isa_plugin.kernels.testing import check_close, plan_rows  # noqa: E402


def sdpa_time(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    import triton

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with sdpa_kernel([be]):
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        return triton.testing.do_bench(fn, warmup=25, rep=500, return_mode="median")


def make_input(N, H, D, data, dev):
    """[1, N, H, D] bf16 benchmark input (see ``--data``)."""
    x = torch.randn(1, N, H, D, device=dev)
    if data == "smooth":
        x = 0.5 * x + torch.randn(1, N // 256 + 1, H, D, device=dev).repeat_interleave(256, dim=1)[:, :N]
    return x.to(torch.bfloat16)


def check_rows(q, k, v, cp, out, n_rows=384, gen=None):
    """Compare ``out`` with the plan's reference on sampled rows (every span kind represented)."""
    N = q.shape[1]
    rows = torch.randperm(N, generator=gen)[:n_rows].sort().values.to(q.device)
    rows = torch.unique(torch.cat([rows, torch.tensor([0, N // 2 - 1, N // 2, N - 1], device=q.device)]))
    plan = compact_to_block_plan(cp)
    ref = plan_rows(q, k, v, plan, rows, chunk=32)
    base = plan_rows(q, k, v, plan, rows, lowp=True, chunk=32)
    got = out[:, rows].float()
    ok, err, berr = check_close(got, ref, base, atol=1e-3)
    rel = ((got - ref).norm() / ref.norm()).item()
    return ok and rel < 2e-2, err, berr, rel


def isa_case(q, k, v, layout, cfg, exact_backend, gen):
    import triton

    dev = q.device
    # correctness first: the timed entry point's output against the reference semantics of its plan
    # (the planner is deterministic: plan_compact gives the plan the op computes internally)
    cp = plan_compact(q, k, layout, cfg, v=v)
    out = isa_attention_kernels(q, k, v, layout, cfg, exact_backend=exact_backend)
    torch.cuda.synchronize()
    ok, err, berr, rel = check_rows(q, k, v, cp, out, gen=gen)
    exact_pairs, approx_pairs = cp.pair_counts()
    del out
    res = dict(ok=ok, err=err, base_err=berr, rel=rel, exact_pairs=exact_pairs, approx_pairs=approx_pairs)
    if not ok:
        return res

    def full():
        return isa_attention_kernels(q, k, v, layout, cfg, exact_backend=exact_backend)

    def plan_only():
        return plan_compact(q, k, layout, cfg, v=v)

    del cp
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    o = full()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(dev)
    extra = peak - base_mem - o.numel() * o.element_size()
    del o
    res["ms"] = triton.testing.do_bench(full, warmup=25, rep=500, return_mode="median")
    res["plan_ms"] = triton.testing.do_bench(plan_only, warmup=10, rep=100, return_mode="median")
    res["extra_mem_k"] = extra / (k.numel() * k.element_size())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[65536])
    ap.add_argument("--heads", type=int, nargs="+", default=[40])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="alpha_f in {0.25,0.5,1} x alpha_s in {0.125,0.5,1}")
    ap.add_argument("--alpha-f-dense", action="store_true", help="compare alpha_f=1 with cuDNN on the same-size dense problem")
    ap.add_argument("--no-flash", action="store_true", help="skip the flash-backend baseline")
    ap.add_argument("--exact-backend", default="auto", choices=["auto", "sdpa", "triton"])
    ap.add_argument("--data", default="randn", choices=["randn", "smooth"],
                    help="randn: i.i.d. tokens (neighbouring query blocks select different key blocks); smooth: tokens "
                    "= a per-256-token component + noise, so neighbouring blocks select alike (as in video attention)")
    ap.add_argument("--record", default=None, help="append the table to this markdown file")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--cost-model", default=None, help="fit time = a*exact + b*approx + c and write it here")
    args = ap.parse_args(argv)

    import triton

    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    gen = torch.Generator().manual_seed(0)
    rows = []
    settings = [(0.125, 0.5)]
    if args.sweep:
        settings = [(s, f) for f in (0.25, 0.5, 1.0) for s in (0.125, 0.5, 1.0)]
    elif args.alpha_f_dense:
        settings = [(0.125, 0.5), (0.125, 1.0)]
    for H in args.heads:
        for N in args.n:
            torch.cuda.empty_cache()
            q, k, v = (make_input(N, H, args.dim, args.data, dev) for _ in range(3))
            layout = Layout([("target", N // 2), ("context", N - N // 2)])
            t_cudnn = sdpa_time(q, k, v, "cudnn")
            t_flash = float("nan") if args.no_flash else sdpa_time(q, k, v, "flash")
            dense_flops = 4.0 * N * N * H * args.dim
            print(f"N={N} H={H} data={args.data}: cuDNN {t_cudnn:.2f} ms ({dense_flops / t_cudnn / 1e9:.0f} TFLOP/s), flash {t_flash:.2f} ms", flush=True)
            for a_s, a_f in settings:
                cfg = ISAConfig(alpha_s=a_s, alpha_f=a_f)
                r = isa_case(q, k, v, layout, cfg, args.exact_backend, gen)
                row = dict(N=N, H=H, D=args.dim, alpha_s=a_s, alpha_f=a_f, alpha_ns=cfg.alpha_ns, cudnn_ms=t_cudnn, flash_ms=t_flash, **r)
                if r["ok"]:
                    flops = 4.0 * args.dim * (r["exact_pairs"] + r["approx_pairs"])
                    row["tflops"] = flops / r["ms"] / 1e9
                    row["speedup"] = t_cudnn / r["ms"]
                    row["plan_share"] = r["plan_ms"] / r["ms"]
                    if a_f == 1.0 and args.alpha_f_dense:
                        nkv = N // 2 + keep_count(a_s, math.ceil((N - N // 2) / 64)) * 64
                        nkv = min(nkv, N)
                        kd, vd = k[:, :nkv], v[:, :nkv]
                        row["dense_same_ms"] = sdpa_time(q, kd, vd, "cudnn")
                        row["vs_dense_same"] = r["ms"] / row["dense_same_ms"]
                    print(
                        f"  a_s={a_s} a_f={a_f}: ISA {r['ms']:.2f} ms  x{row['speedup']:.2f}  {row['tflops']:.0f} TFLOP/s  "
                        f"plan {100 * row['plan_share']:.1f}%  mem {r['extra_mem_k']:.2f}k  err {r['err']:.2e} (torch {r['base_err']:.2e}) rel {r['rel']:.1e}"
                        + (f"  vs dense-same {row['vs_dense_same']:.3f}" if "vs_dense_same" in row else ""),
                        flush=True,
                    )
                else:
                    print(f"  a_s={a_s} a_f={a_f}: FAIL correctness err {r['err']:.3e} (torch {r['base_err']:.3e}) rel {r['rel']:.2e}; no time reported", flush=True)
                rows.append(row)
            del q, k, v

    # table
    hdr = "| GPU | H | N | α_s | α_f | cuDNN ms | flash ms | ISA ms | speed-up | TFLOP/s | plan % | extra mem (×k) | α_f=1 / dense-same | check |"
    lines = [hdr, "|" + "---|" * 14]
    for r in rows:
        if r["ok"]:
            lines.append(
                f"| {gpu} | {r['H']} | {r['N']} | {r['alpha_s']} | {r['alpha_f']} | {r['cudnn_ms']:.2f} | {r['flash_ms']:.2f} | {r['ms']:.2f} | "
                f"{r['speedup']:.2f}× | {r['tflops']:.0f} | {100 * r['plan_share']:.1f} | {r['extra_mem_k']:.2f} | "
                f"{r.get('vs_dense_same', float('nan')):.3f} | ok (rel {r['rel']:.1e}) |"
            )
        else:
            lines.append(f"| {gpu} | {r['H']} | {r['N']} | {r['alpha_s']} | {r['alpha_f']} | {r['cudnn_ms']:.2f} | {r['flash_ms']:.2f} | – | – | – | – | – | – | FAIL |")
    table = "\n".join(lines)
    print(table)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)
    if args.record:
        cmd = "python benchmarks/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.record, "a") as f:
            f.write(
                f"\n### {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
                f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n\n`{cmd}`\n\n{table}\n"
            )
    if args.cost_model:
        fit_cost_model([r for r in rows if r["ok"]], gpu, args.cost_model)
    return rows


def fit_cost_model(rows, gpu, path):
    """Fit ms = max(floor, a * E + b * A + c) per card (E, A: exact / approximated pairs in 1e9, scaled by D/128;
    least squares weighted by 1/ms; floor = fastest call seen) and merge it into ``path`` (fields: see its ``doc``)."""
    if len(rows) < 3:
        print("cost model: need at least 3 measured settings", flush=True)
        return
    A = torch.tensor([[r["exact_pairs"] / 1e9 * r["D"] / 128, r["approx_pairs"] / 1e9 * r["D"] / 128, 1.0] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["ms"] for r in rows], dtype=torch.float64)
    w = 1.0 / y  # relative error weighting
    sol = torch.linalg.lstsq(A * w[:, None], (y * w).unsqueeze(1)).solution.squeeze(1).tolist()
    floor = min(r["ms"] for r in rows)
    pred = (A @ torch.tensor(sol, dtype=torch.float64)).clamp_min(floor)
    rel = ((pred - y).abs() / y).max().item()
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("cards", {})
    data["cards"][gpu] = dict(
        ms_per_gexact_pair=sol[0], ms_per_gapprox_pair=sol[1], ms_per_call=sol[2], host_floor_ms=floor,
        dense_cudnn_ms_per_gpair=sum(r["cudnn_ms"] / (r["N"] ** 2 * r["H"] / 1e9) for r in rows) / len(rows),
        fitted_on=len(rows), max_rel_error=rel, torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"cost model for {gpu}: {sol} (max rel err {rel:.2f}) -> {path}", flush=True)


if __name__ == "__main__":
    main()
