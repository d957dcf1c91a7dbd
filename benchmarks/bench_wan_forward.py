"""Benchmark: one Wan transformer forward with ISA (default ratios) vs stock diffusers attention.

Shape (defaults): Wan 14B (40 heads x head_dim 128 = 5120, ffn 13824, 40 layers), random bf16 weights,
480p 81-frame in-context edit: latent grid 2 x 21 x 30 x 52, i.e. 42 latent frames of which 21 are the
source video's context frames (65,520 tokens), batch 2 (CFG), 512 text tokens. The ISA layout is
``WanICLLayout(context_frames=21)`` ([target 32,760; context 32,760]).

Measured: median wall time (CUDA events) of ``transformer(...)`` over ``--reps`` runs after ``--warmup``,
for the stock model (diffusers' default attention dispatch, and with ``--dense-backends`` also SDPA
forced to cuDNN / flash), then with ``isa_plugin.apply_isa`` (ISA on ``blocks.N.attn1``; cross-attention
stock). Printed: ms, speed-up, peak memory, ISA calls and dense fallbacks per layer (with reasons), and the
relative L1 distance of the ISA output to the stock output (informational: random weights).

Correctness gate (no speed is reported when it fails): on layer 0's q, k, v of the ISA forward,
``isa_attention`` with all ratios 1 must match dense SDPA (bf16 tolerance), the default-ratio output must
be finite, and every ISA layer must have run ISA (no fallback) in the timed forwards.

Memory: 14B bf16 weights are about 28 GB; a 65,520-token batch-2 block peaks at roughly 20 GB more. Use
``--layers`` to cut the weights (the speed-up of a forward does not depend on the layer count much:
every block is identical). Runtime at 40 layers on one H100: about 4-6 minutes.

Examples:
    python benchmarks/bench_wan_forward.py                          # 14B shape, 40 layers
    python benchmarks/bench_wan_forward.py --layers 8 --block-size 128 \
        --config '{"mode": "adaptive", "mass": 0.9, "pseudo_block": 128, "alpha_s": 1.0}'   # another ISA setting
    python benchmarks/bench_wan_forward.py --layers 20 --dense-backends default
    python benchmarks/bench_wan_forward.py --record benchmarks/RESULTS.md
    python benchmarks/bench_wan_forward.py --device cpu --layers 1 --heads 2 --frames 4 --height 8 --width 8 \
        --context-frames 2 --text 8 --ffn 64 --block-size 8      # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wan_model import build_wan_transformer  # noqa: E402
import isa_plugin  # noqa: E402
from isa_plugin import ISAConfig  # noqa: E402
from isa_plugin.adapters import apply_isa, observe_attention, remove_isa, stats  # noqa: E402
from isa_plugin.adapters.families.wan import WanICLLayout  # noqa: E402
from isa_plugin.executors.reference import plan_reference  # noqa: E402


def build_model(a, device):
    return build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=a.layers,
                                 text_dim=4096 if a.text_dim is None else a.text_dim, device=device, dtype=torch.bfloat16)


def make_inputs(a, device, text_dim):
    g = torch.Generator(device=device).manual_seed(0)
    F = a.frames + a.context_frames
    x = torch.randn(a.batch, 16, F, a.height, a.width, generator=g, device=device, dtype=torch.bfloat16)
    e = torch.randn(a.batch, a.text, text_dim, generator=g, device=device, dtype=torch.bfloat16)
    t = torch.full((a.batch,), 500, device=device, dtype=torch.long)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)


def timed(fn, reps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def sdpa_context(name):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--text-dim", type=int, default=None, help="text encoder width (default 4096)")
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=21, help="target latent frames")
    ap.add_argument("--context-frames", type=int, default=21, help="context latent frames (source video)")
    ap.add_argument("--height", type=int, default=60, help="latent height (before the 2x2 patch)")
    ap.add_argument("--width", type=int, default=104, help="latent width (before the 2x2 patch)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--config", default=None,
                    help='the ISA setting as ISAConfig fields in JSON (default: the paper ratios), e.g. '
                         '\'{"mode": "adaptive", "mass": 0.9, "pseudo_block": 128, "alpha_s": 1.0, "backend": "sparse"}\'')
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dense-backends", default="default,cudnn", help="comma list of default, cudnn, flash")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--record", default=None, help="append a markdown result row to this file")
    a = ap.parse_args()

    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu for a smoke test")
    text_dim = 4096 if a.text_dim is None else a.text_dim
    tokens = (a.frames + a.context_frames) * (a.height // 2) * (a.width // 2)
    t_start = time.time()
    print(f"Wan transformer: {a.layers} layers, {a.heads} heads x {a.head_dim}, ffn {a.ffn}; batch {a.batch}, "
          f"{tokens} tokens ({a.frames}+{a.context_frames} latent frames of {a.height // 2}x{a.width // 2}), "
          f"{a.text} text tokens, bf16, {device}", flush=True)
    model = build_model(a, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built in {time.time() - t_start:.0f} s: {n_params / 1e9:.2f} B parameters", flush=True)
    inputs = make_inputs(a, device, text_dim)

    def fwd():
        with torch.no_grad():
            return model(**inputs)[0]

    def peak_gb():
        return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    results = {}
    ref = None
    for be in [b.strip() for b in a.dense_backends.split(",") if b.strip()]:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with sdpa_context(be):
                ms, out = timed(fwd, a.reps, a.warmup, device)
        except RuntimeError as e:  # e.g. no cuDNN attention on this build / card
            print(f"stock attention ({be:7s}): unavailable ({str(e).splitlines()[0][:120]})", flush=True)
            continue
        results[f"stock ({be})"] = (ms, peak_gb())
        print(f"stock attention ({be:7s}): {ms:10.1f} ms   peak {peak_gb():6.1f} GiB", flush=True)
        if ref is None:
            ref = out.float()
        del out

    cfg = ISAConfig.from_dict(dict(json.loads(a.config), block_size=a.block_size)) if a.config else ISAConfig(block_size=a.block_size)
    print(f"ISA setting: {cfg}", flush=True)
    apply_isa(model, cfg, layout=WanICLLayout(context_frames=a.context_frames))
    exact_cfg = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=a.block_size)
    check = {}
    density = {}

    def check_layer0(name, q, k, v, layout, step):
        # every layer of the warm-up forward: the relative cost ((exact + pseudo pairs) / N²) of its plan
        if name not in density:
            with torch.no_grad():
                density[name] = plan_reference(q, k, layout, cfg).relative_cost()
        # layer 0 of the warm-up forward: all-ratios-1 ISA must equal dense SDPA; default ratios must be finite
        if name != "blocks.0.attn1" or check:
            return
        with torch.no_grad():
            ex, info = isa_plugin.isa_attention(q, k, v, layout, exact_cfg, return_info=True)
            dense = isa_plugin.attention.dense_attention(q, k, v)
            err = (ex.float() - dense.float()).abs().max().item()
            del ex
            sparse = isa_plugin.isa_attention(q, k, v, layout, cfg)
            finite = bool(torch.isfinite(sparse).all())
            rel = ((sparse.float() - dense.float()).abs().mean() / dense.float().abs().mean()).item()
        check.update(err=err, used_isa=info.used_isa, finite=finite, rel=rel, layout=layout)

    with observe_attention(model, check_layer0, dense=False):
        fwd()  # also the first warm-up (Triton compilation / autotuning)
    isa_plugin.adapters.reset_stats(model)
    if density:
        print(f"ISA plans' relative cost ((exact + pseudo pairs) / N²) per layer: "
              f"{', '.join(f'{d:.3f}' for d in density.values())}; mean {statistics.mean(density.values()):.3f}", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms_isa, out_isa = timed(fwd, a.reps, max(0, a.warmup - 1), device)
    results["ISA"] = (ms_isa, peak_gb())
    s = stats(model)
    per_call = a.reps + max(0, a.warmup - 1)

    # ---------------------------------------------------------------- correctness gate
    failures = []
    if not torch.isfinite(out_isa).all():
        failures.append("ISA forward output has non-finite values")
    bad_layers = {n: v for n, v in s.items() if v["fallbacks"] or v["isa_calls"] != per_call}
    if bad_layers:
        failures.append(f"{len(bad_layers)} layers did not run ISA on every call")
    if not check:
        failures.append("layer 0 was never observed")
    else:
        err = check["err"]
        tol = 2e-2
        if not check["used_isa"] or err > tol:
            failures.append(f"all-ratios-1 ISA vs dense on layer 0: max |diff| {err:.3g} > {tol} (used_isa={check['used_isa']})")
        if not check["finite"]:
            failures.append("default-ratio ISA output of layer 0 has non-finite values")
        print(f"layout {check['layout']}")
    out_rel = ((out_isa.float() - ref).abs().mean() / ref.abs().mean()).item()

    # ---------------------------------------------------------------- report
    total_isa = sum(v["isa_calls"] for v in s.values())
    total_fb = sum(v["fallbacks"] for v in s.values())
    reasons = {}
    for v in s.values():
        for r, c in v["reasons"].items():
            reasons[r] = reasons.get(r, 0) + c
    print(f"ISA per-layer counters over {per_call} forwards: {total_isa} ISA calls, {total_fb} dense fallbacks "
          f"{reasons if reasons else ''}")
    for n, v in s.items():
        if v["fallbacks"] or v["isa_calls"] != per_call:
            print(f"  {n}: {v}")
    if check:
        print(f"layer 0 attention, default ratios vs dense: relative L1 {check['rel']:.4f}; "
              f"all ratios 1 vs dense: max |diff| {check['err']:.3g}")
    print(f"forward output, ISA vs stock (random weights, informational): relative L1 {out_rel:.4f}")

    print()
    print("| variant | forward ms | speed-up of ISA | peak GiB |")
    print("|---|---|---|---|")
    for name, (ms, gb) in results.items():
        sp = "" if name == "ISA" else (f"{ms / ms_isa:.2f}x" if not failures else "n/a")
        print(f"| {name} | {ms:.1f} | {sp} | {gb:.1f} |")
    if failures:
        print("\nCORRECTNESS CHECK FAILED, no speed reported:\n  " + "\n  ".join(failures))
    else:
        base = results["stock (default)"][0] if "stock (default)" in results else None
        if base is not None:
            print(f"\nISA speed-up over stock diffusers attention (default dispatch): {base / ms_isa:.2f}x (target >= 1.8x)")

    if a.record and not failures:
        import diffusers

        try:
            import triton

            tv = triton.__version__
        except Exception:
            tv = "none"
        gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
        with open(a.record, "a") as f:
            f.write(
                f"\n### bench_wan_forward {datetime.date.today().isoformat()} — {gpu}, torch {torch.__version__}, "
                f"triton {tv}, diffusers {diffusers.__version__}\n\n"
                f"{a.layers} layers x {a.heads} heads x {a.head_dim}, batch {a.batch}, {tokens} tokens "
                f"({a.frames}+{a.context_frames} latent frames), block {a.block_size}, default ratios; "
                f"ISA calls {total_isa}, fallbacks {total_fb} {reasons or ''}\n\n| variant | forward ms | ISA speed-up | peak GiB |\n|---|---|---|---|\n"
            )
            for name, (ms, gb) in results.items():
                f.write(f"| {name} | {ms:.1f} | {'' if name == 'ISA' else f'{ms / ms_isa:.2f}x'} | {gb:.1f} |\n")
        print(f"recorded in {a.record}")
    print(f"total wall time {time.time() - t_start:.0f} s")
    remove_isa(model)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
