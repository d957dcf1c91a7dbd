"""Benchmark: ISA under diffusers' Ulysses context parallelism vs dense Ulysses, on a Wan-14B-shaped model.

Launch with torchrun (NCCL on GPUs, gloo with ``--tiny`` on CPU); the world size W bounds the degrees:
every P in ``--degrees`` (default 1, 2, 4) that divides W is run, as W/P independent groups of P ranks
(P = 1: no context parallelism). Shape: 40 heads x 128 (5120), ffn 13824, ``--layers`` blocks, random
bf16 weights, batch 2, 512 text tokens; 65,520 tokens (21 + 21 latent frames of 30 x 52) and 131,040
tokens (42 + 42), ISA layout ``WanICLLayout(context_frames=...)``.

Measured per (tokens, P): median forward time (CUDA events, after a barrier) of the stock model under
Ulysses ("dense") and with ``apply_isa`` ("ISA"); scaling efficiency T(1) / (P · T(P)) per variant; the
all-to-all share: the measured time of one layer's four exchanges (q, k, v and the output, diffusers'
``_all_to_all_single`` on the layer's shapes) times the layer count, over the forward time.

Correctness gate (no time is reported for a P whose check fails): on a ``--check-layers`` model, the ISA
output under Ulysses against single-GPU ISA on every rank (relative L1 ≤ ``--check-tol``), and no ISA
layer may fall back in the timed forwards.

Examples:
    torchrun --nproc_per_node 1 benchmarks/bench_context_parallel.py --layers 2
    torchrun --nproc_per_node 4 benchmarks/bench_context_parallel.py --layers 40
    torchrun --nproc_per_node 2 benchmarks/bench_context_parallel.py --tiny     # CPU, gloo: the script works
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "parallel"))

from wan_model import build_wan_transformer  # noqa: E402
from isa_plugin import ISAConfig  # noqa: E402
from isa_plugin.adapters import apply_isa, remove_isa, stats  # noqa: E402
from isa_plugin.adapters.families.wan import WanICLLayout  # noqa: E402


def log(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def build(a, layers, device, dtype):
    torch.manual_seed(0)  # the same weights on every rank
    return build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=layers, text_dim=a.text_dim,
                                 device=device, dtype=dtype)


def make_inputs(a, frames, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.batch, 16, 2 * frames, a.height, a.width, generator=g, device=device, dtype=dtype)
    e = torch.randn(a.batch, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((a.batch,), 500, device=device, dtype=torch.long)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def timed(fn, a, device):
    for _ in range(a.warmup):
        fn()
    times = []
    for _ in range(a.reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def mesh_for(P, device):
    """A (replica, ring, ulysses) mesh: W/P independent groups of P ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    W = dist.get_world_size()
    return init_device_mesh(device.type, (W // P, 1, P), mesh_dim_names=("replica", "ring", "ulysses"))


def enable(model, P, device):
    from diffusers import ContextParallelConfig

    if P > 1:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P, mesh=mesh_for(P, device)))


def all_to_all_ms(a, P, tokens, device, dtype, mesh):
    """Median time of one layer's four Ulysses exchanges (q, k, v, output) on this P."""
    if P == 1:
        return 0.0
    from diffusers.models.attention_dispatch import _all_to_all_single

    group = mesh["ulysses"].get_group()
    x = torch.randn(P, tokens // P, a.batch, a.heads // P, a.head_dim, device=device, dtype=dtype)

    def run():
        for _ in range(4):
            _all_to_all_single(x, group)

    ms, _ = timed(run, a, device)
    return ms


def rel_l1(x, y):
    return ((x.float() - y.float()).abs().sum() / y.float().abs().sum().clamp_min(1e-12)).item()


def check(a, P, frames, device, dtype, config):
    """Relative L1 of ISA under Ulysses vs single-GPU ISA on a reduced model, and whether every layer ran ISA."""
    layout = WanICLLayout(context_frames=frames)
    x = make_inputs(a, frames, device, dtype)
    m = build(a, a.check_layers, device, dtype)
    apply_isa(m, config, layout=layout)
    with torch.no_grad():
        single = m(**x)[0]
    if P == 1:
        return 0.0, all(s["fallbacks"] == 0 for s in stats(m).values())
    enable(m, P, device)
    remove_isa(m)
    apply_isa(m, config, layout=layout)
    with torch.no_grad():
        out = m(**x)[0]
    ok = all(s["fallbacks"] == 0 and s["isa_calls"] == 1 for s in stats(m).values())
    del m
    return rel_l1(out, single), ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--check-layers", type=int, default=2)
    ap.add_argument("--check-tol", type=float, default=1e-2, help="relative L1 of the check (bf16)")
    ap.add_argument("--degrees", default="1,2,4")
    ap.add_argument("--frames", default="21,42", help="target latent frames per run (as many context frames)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo at tiny sizes (checks that the script works)")
    a = ap.parse_args()
    if a.tiny:
        a.layers, a.check_layers, a.heads, a.head_dim, a.ffn, a.text_dim, a.text = 2, 1, 4, 32, 64, 16, 8
        a.height = a.width = 8
        a.frames, a.block_size, a.reps, a.warmup, a.check_tol = "2", 8, 1, 0, 1e-5

    tiny_cpu = a.tiny or not torch.cuda.is_available()
    dist.init_process_group("gloo" if tiny_cpu else "nccl")
    if tiny_cpu:
        import cp_harness

        cp_harness.cpu_shims()  # enable_parallelism on a machine without accelerator
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
        torch.cuda.set_device(device)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    W = dist.get_world_size()
    degrees = [P for P in (int(p) for p in a.degrees.split(",")) if W % P == 0 and a.heads % P == 0]
    config = ISAConfig(block_size=a.block_size)
    log(f"Wan {a.layers} layers, {a.heads} heads x {a.head_dim}, ffn {a.ffn}, batch {a.batch}, {dtype}, "
        f"{device.type}, world {W}; degrees {degrees}")
    rows = []
    for frames in (int(f) for f in a.frames.split(",")):
        tokens = 2 * frames * (a.height // 2) * (a.width // 2)
        x = make_inputs(a, frames, device, dtype)
        base = {}
        for P in degrees:
            err, ok = check(a, P, frames, device, dtype, config)
            ok_all = torch.tensor([float(ok and err <= a.check_tol)], device=device)
            dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
            if ok_all.item() < 1:
                log(f"{tokens} tokens, P={P}: CHECK FAILED (rel L1 {err:.2e}, every layer ISA: {ok}); no time reported")
                continue
            m = build(a, a.layers, device, dtype)
            enable(m, P, device)

            def fwd():
                with torch.no_grad():
                    return m(**x)[0]

            dense_ms, _ = timed(fwd, a, device)
            apply_isa(m, config, layout=WanICLLayout(context_frames=frames))
            isa_ms, _ = timed(fwd, a, device)
            fell_back = sum(s["fallbacks"] for s in stats(m).values())
            a2a = all_to_all_ms(a, P, tokens, device, dtype, mesh_for(P, device) if P > 1 else None) * a.layers
            del m
            if fell_back:
                log(f"{tokens} tokens, P={P}: {fell_back} ISA fallbacks in the timed forwards; no time reported")
                continue
            base.setdefault("dense", dense_ms if P == 1 else None)
            base.setdefault("isa", isa_ms if P == 1 else None)
            eff = lambda kind, ms: (base[kind] / (P * ms)) if base.get(kind) else float("nan")  # noqa: E731
            rows.append((tokens, P, dense_ms, isa_ms, dense_ms / isa_ms, eff("dense", dense_ms), eff("isa", isa_ms),
                         a2a / dense_ms, a2a / isa_ms, err))
    log("\n| tokens | P | dense Ulysses ms | ISA Ulysses ms | ISA speed-up | dense eff. | ISA eff. | a2a share dense | "
        "a2a share ISA | ISA vs 1-GPU ISA (rel L1) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log("| {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.2f} | {:.2f} | {:.1%} | {:.1%} | {:.1e} |".format(*r))
    if device.type == "cuda":
        log(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
