"""Benchmark of the block-sparse plan executor (``isa_plugin/kernels/sparse_attn.py``) against cuDNN dense SDPA.

Shapes: B = 1, N = 65,536 (target + context, 32,768 each), H = 40, D = 128, bf16 (Wan-14B sized). Plans:
every key block kept, every query block with exactly round((1 - s) * nb) random exact key blocks
(``sparsity_plan`` of tests/kernels/sparse_attn_helpers.py), for block sizes b = 128 and 64 and sparsities
s = 0 (every row full: the executor as dense attention), 0.5, 0.75, 0.9. The remaining (s * nb) kept blocks
of a row enter as block-mean pseudo-keys.

FLOP model: an exact (query token, key token) pair costs 4·D FLOP (q·k and p·v); a pseudo-key pair the
same. Reported per row of the table:

- ``ms``: median time of ``execute_block_plan`` (pooling, device-side lists, bit sets, work order and the
  kernel), by ``triton.testing.do_bench``; ``kernel ms``: the attention kernel alone on prepared
  arguments; ``prep ms``: everything before it;
- ``exact TF/s`` = exact pairs · 4·D / ms (the product's rate), ``/cuDNN`` its ratio to cuDNN's dense rate
  4·N²·H·D / ms measured in the same process (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`` on contiguous
  [B, H, N, D] tensors; the rate on [B, N, H, D] views transposed to [B, H, N, D] is printed beside it);
- ``all TF/s``: exact + pseudo-key pairs, per the same time.

Targets (product): exact-pair rate >= 0.75 x cuDNN's dense rate at b = 128 (0.85 stretch), >= 0.6 x at b = 64.

Correctness before speed: a small ragged problem (text span, 1-token span, two context spans, B = 2,
different plans per entry) is compared whole with the reference on the same plan for every block size,
and every timed configuration is checked on a sample of query rows first; a configuration whose output
fails FlashAttention's rule (error <= 2 x PyTorch-same-dtype error + 1e-3) gets no speed, and the script
exits with status 1.

Usage (GPU machine): ``python benchmarks/bench_sparse_executor.py [--n 65536 --heads 40 --blocks 128 64
--sparsity 0 0.5 0.75 0.9 --json out.json]``. ``--device cpu`` (with TRITON_INTERPRET=1 and small sizes)
runs the same code path with wall-clock timing, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests", "kernels"))
sys.path.insert(0, os.path.dirname(_HERE))

from sparse_attn_helpers import random_plan, reference_out, sparsity_plan  # noqa: E402

from isa_plugin import Layout  # noqa: E402
from isa_plugin.kernels import sparse_attn  # noqa: E402
from isa_plugin.plan import BlockPlan  # noqa: E402


def _env(device) -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def _timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn, reps=2):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    return wall


def _inputs(B, N, H, D, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g, device=device, dtype=dtype) for _ in range(3)]


def correctness_gate(args, device, dtype) -> bool:
    """Whole-output comparison with the reference on a small ragged problem, every block size."""
    layout = Layout([("text", 77), ("target", 1500), ("context", 1), ("context", 1201), ("target", 63)]
                    if device == "cuda" else [("text", 7), ("target", 150), ("context", 1), ("context", 120)])
    ok_all = True
    for bs in args.blocks:
        q, k, v = _inputs(2, layout.num_tokens, 3, args.dim, dtype, device, seed=bs)
        plan = random_plan(layout.blocks(bs), 2, 3, torch.Generator(device=device).manual_seed(bs), device=device)
        out = sparse_attn.execute_block_plan(q, k, v, plan)
        ok, err, berr = reference_out(out, q, k, v, plan)
        print(f"gate b={bs}: N={layout.num_tokens} B=2 H=3 D={args.dim} {str(dtype)[6:]}: max error {err:.3e}, "
              f"torch-same-dtype {berr:.3e} -> {'ok' if ok else 'WRONG'}")
        ok_all &= ok
    return ok_all


def dense_baseline(args, device, dtype, bench) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, N, H, D = 1, args.n, args.heads, args.dim
    flops = 4.0 * N * N * H * D * B
    if device != "cuda":
        return {"ms": float("nan"), "tflops": float("nan"), "ms_view": float("nan"), "tflops_view": float("nan")}
    q, k, v = _inputs(B, N, H, D, dtype, device, seed=0)
    res = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
        res.update(ms=ms, tflops=flops / ms * 1e-9)
        del qh, kh, vh
        qv, kv, vv = (x.transpose(1, 2) for x in (q, k, v))
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qv, kv, vv))
        res.update(ms_view=ms, tflops_view=flops / ms * 1e-9)
    del q, k, v
    torch.cuda.empty_cache()
    return res


def run_config(args, device, dtype, bench, q, k, v, bs, s, pseudo=None) -> dict:
    N, H, D = args.n, args.heads, args.dim
    layout = Layout([("target", N // 2), ("context", N - N // 2)])
    blocks = layout.blocks(bs)
    plan = sparsity_plan(blocks, 1, H, s, seed=int(bs * 100 + s * 100), device=device)
    ps, kind = pseudo or (bs, "mean")
    ps = min(ps, bs)
    if ps != bs:  # the same exact lists with C = bs / ps pseudo-key slots per block
        plan = BlockPlan(plan.blocks, plan.kv_keep, plan.row_ptr, plan.col_idx, ps, pseudo_keys=kind)
    exact_pairs, pseudo_pairs = plan.pair_counts()
    row = {"block": bs, "sparsity": s, "nb": blocks.num_blocks, "pseudo_block": ps, "pseudo_keys": kind,
           "exact_blocks_per_row": int(plan.exact_counts()[0, 0, 0]), "exact_pairs": exact_pairs, "pseudo_pairs": pseudo_pairs}
    out = sparse_attn.execute_block_plan(q, k, v, plan)  # autotunes on the first call of this shape
    g = torch.Generator(device=device).manual_seed(1)
    rows = torch.unique(torch.cat([torch.randperm(N, generator=g, device=device)[: args.check_rows],
                                   torch.tensor([0, N // 2 - 1, N // 2, N - 1], device=device)]))
    ok, err, berr = reference_out(out, q, k, v, plan, rows=rows)
    row.update(check_rows=int(rows.numel()), max_err=err, torch_err=berr, correct=bool(ok))
    if not ok:
        print(f"b={bs} s={s}: WRONG output (error {err:.3e} > 2 x {berr:.3e} + 1e-3): no speed reported")
        return row
    del out
    ms = bench(lambda: sparse_attn.execute_block_plan(q, k, v, plan))
    starts, counts, log2n = sparse_attn.block_meta(plan.blocks, str(q.device))
    prep = lambda: sparse_attn._prepare(q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n,  # noqa: E731
                                        bs, D ** -0.5, None, ps, plan.pseudo_key_iterations)
    prepared = prep()
    ms_kernel = bench(lambda: sparse_attn._launch(prepared))
    # the exact part alone (the same kernel without the pseudo-key tail): the time the exact-pair rate is defined on
    ms_exact = bench(lambda: sparse_attn._launch(prepared, exact_only=True))
    del prepared
    ms_prep = bench(prep)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        o = sparse_attn.execute_block_plan(q, k, v, plan)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - o.numel() * o.element_size()
        row["extra_mib_beyond_out"] = round(extra / 2**20, 1)
        del o
    row.update(ms=ms, ms_kernel=ms_kernel, ms_prep=ms_prep,
               exact_tflops=exact_pairs * 4 * D / ms * 1e-9, all_tflops=(exact_pairs + pseudo_pairs) * 4 * D / ms * 1e-9,
               exact_tflops_kernel=exact_pairs * 4 * D / ms_kernel * 1e-9, ms_exact_part=ms_exact,
               exact_tflops_exact_part=exact_pairs * 4 * D / ms_exact * 1e-9)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--check-rows", type=int, default=128, help="sampled query rows checked per configuration")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None, help="write the environment and every row here")
    ap.add_argument("--pseudo", nargs="+", default=None,
                    help="pseudo-key variants SIZE:KIND (e.g. 128:mean 16:mean 16:kmeans; default: one block mean per block)")
    args = ap.parse_args(argv)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bench = _timer(device)
    env = _env(device)
    print(json.dumps(env))
    if not correctness_gate(args, device, dtype):
        print("correctness gate failed: no speeds reported")
        return 1
    dense = dense_baseline(args, device, dtype, bench)
    print(f"cuDNN dense SDPA, B=1 N={args.n} H={args.heads} D={args.dim} {args.dtype}: {dense['ms']:.2f} ms = "
          f"{dense['tflops']:.1f} TFLOP/s on contiguous [B, H, N, D]; {dense['ms_view']:.2f} ms = "
          f"{dense['tflops_view']:.1f} TFLOP/s on transposed [B, N, H, D] views")
    q, k, v = _inputs(1, args.n, args.heads, args.dim, dtype, device, seed=1)
    rows, failed = [], False
    pseudo = [(int(x.split(":")[0]), x.split(":")[1]) for x in args.pseudo] if args.pseudo else [None]
    for bs in args.blocks:
        for s, ps in [(s, ps) for s in args.sparsity for ps in pseudo]:
            r = run_config(args, device, dtype, bench, q, k, v, bs, s, ps)
            if "ms" in r:
                r["ratio_cudnn"] = r["exact_tflops"] / dense["tflops"]
                r["ratio_cudnn_kernel"] = r["exact_tflops_kernel"] / dense["tflops"]
                r["ratio_cudnn_exact_part"] = r["exact_tflops_exact_part"] / dense["tflops"]
                print(f"b={bs} s={s} pseudo={r['pseudo_block']}:{r['pseudo_keys']}: {r['ms']:.2f} ms (kernel {r['ms_kernel']:.2f}, prep {r['ms_prep']:.2f}), "
                      f"exact {r['exact_tflops']:.1f} TFLOP/s = {r['ratio_cudnn']:.3f} x cuDNN", flush=True)
            failed |= not r["correct"]
            rows.append(r)
    print()
    print(f"| b | pseudo-keys | sparsity | exact blocks/row | ms | kernel ms | prep ms | exact TF/s | /cuDNN | kernel /cuDNN | exact part ms | "
          f"exact part /cuDNN | all TF/s | max err (torch err) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['block']} | {r['pseudo_block']}:{r['pseudo_keys']} | {r['sparsity']:.2f} | {r['exact_blocks_per_row']} / {r['nb']} | {r['ms']:.2f} | {r['ms_kernel']:.2f} | "
                  f"{r['ms_prep']:.2f} | {r['exact_tflops']:.1f} | {r['ratio_cudnn']:.3f} | {r['ratio_cudnn_kernel']:.3f} | "
                  f"{r['ms_exact_part']:.2f} | {r['ratio_cudnn_exact_part']:.3f} | {r['all_tflops']:.1f} | {r['max_err']:.2e} ({r['torch_err']:.2e}) |")
        else:
            print(f"| {r['block']} | {r['pseudo_block']}:{r['pseudo_keys']} | {r['sparsity']:.2f} | {r['exact_blocks_per_row']} / {r['nb']} | WRONG | | | | | | | | | "
                  f"{r['max_err']:.2e} ({r['torch_err']:.2e}) |")
    print(f"| cuDNN dense | | 0 | all | {dense['ms']:.2f} | | | {dense['tflops']:.1f} | 1.000 | | | | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "cudnn_dense": dense, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
