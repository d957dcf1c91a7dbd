"""Benchmark: time of an ISA calibration pass vs the dense transformer runs it observes.

Acceptance (issue "Calibration pass, threshold profiles and the isa CLI"): calibrating a Wan-14B-shaped
transformer on 2 videos x 4 timesteps takes at most 2x the time of the dense runs themselves.

Shape (defaults): Wan 14B (40 heads x head_dim 128, ffn 13824, 40 layers), random bf16 weights, 480p
81-frame in-context edit: 21 target + 21 context latent frames of 30 x 52 tokens = 65,520 tokens per
call, 512 text tokens, batch 1 per call (Wan runs cond and uncond as separate calls). A "video" is a
random latent (one seed per video); each of the 4 sampled timesteps runs both CFG branches: 2 x 4 x 2 =
16 transformer forwards.

Measured (wall time with CUDA synchronisation, one pass each after one warm-up forward of each kind):
- dense: the 16 forwards with the stock diffusers processors;
- calibration: the same 16 forwards under :func:`isa_plugin.adapters.observe_attention` with the
  :class:`~isa_plugin.calibration.recorder.StatsObserver` measuring every self-attention call (sampled
  query blocks, exact dense rows, the whole (metric, α_s, α_f, α_ns) grid), plus ``fit_profile``.
Printed: minutes, the ratio, per-forward seconds, peak memory, and the fitted profile's summary.

Correctness gate (no timing is reported when it fails): the observed forward's output must equal the stock
forward's output (bitwise, or within 1e-3 of its largest magnitude: the observer must not change the model's
computation), and every layer must have been measured on every call.

Work of the measurement per layer call at the default shape (48 blocks x 16 tokens per kind): about 2 TFLOP
(TF32 matmuls; 2% of the dense attention's 88 TFLOP) and about 200 GB of memory traffic (score and per-block
numerator buffers), i.e. roughly 0.1 s on an H100 against about 0.23 s for the dense block.

Memory: 14B bf16 weights are about 28 GB; the calibration adds a few GB of transient buffers per layer.
Runtime at 40 layers on one H100: about 6 minutes (fits one 10-minute device call); ``--layers 20`` halves it
(the ratio does not depend on the layer count: every block is identical).

Examples:
    python benchmarks/bench_calibration.py                       # 14B shape, 40 layers
    python benchmarks/bench_calibration.py --layers 20 --json out.json
    python benchmarks/bench_calibration.py --device cpu --layers 1 --heads 2 --head-dim 32 --frames 2 \
        --context-frames 2 --height 8 --width 8 --text 8 --ffn 64 --text-dim 32 --block-size 8   # CPU smoke test
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wan_model import build_wan_transformer  # noqa: E402
import isa_plugin  # noqa: E402
from isa_plugin.adapters import observe_attention  # noqa: E402
from isa_plugin.adapters.wan import WanICLLayout  # noqa: E402
from isa_plugin.calibration import CalibrationStats, fit_profile, load_cost_model  # noqa: E402
from isa_plugin.calibration.recorder import StatsObserver  # noqa: E402


def build_model(a, device):
    return build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=a.layers, text_dim=a.text_dim,
                                 device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def make_calls(a, device, dtype):
    """The transformer calls of the run: per video, per sampled timestep, cond and uncond."""
    calls = []
    F = a.frames + a.context_frames
    timesteps = torch.linspace(999, 50, a.timesteps).round().tolist()
    for vid in range(a.videos):
        g = torch.Generator(device=device).manual_seed(100 + vid)
        x = torch.randn(1, 16, F, a.height, a.width, generator=g, device=device, dtype=dtype)
        cond = torch.randn(1, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
        uncond = torch.randn(1, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
        for t in timesteps:
            for e in (cond, uncond):
                calls.append(dict(hidden_states=x, timestep=torch.tensor([t], device=device), encoder_hidden_states=e,
                                  return_dict=False))
    return calls


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--frames", type=int, default=21, help="target latent frames")
    ap.add_argument("--context-frames", type=int, default=21, help="context latent frames")
    ap.add_argument("--height", type=int, default=60, help="latent height (before the 2x2 patch)")
    ap.add_argument("--width", type=int, default=104, help="latent width (before the 2x2 patch)")
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--blocks-per-kind", type=int, default=48)
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu for a smoke test")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    t0 = time.perf_counter()
    model = build_model(a, dev)
    calls = make_calls(a, dev, dtype)
    tokens = (a.frames + a.context_frames) * (a.height // 2) * (a.width // 2)
    print(f"model: {a.layers} layers x {a.heads} heads x {a.head_dim}, {tokens} tokens/call, {len(calls)} forwards "
          f"({a.videos} videos x {a.timesteps} timesteps x 2 CFG branches); built in {time.perf_counter() - t0:.1f} s", flush=True)
    layout = WanICLLayout(context_frames=a.context_frames)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with torch.no_grad():
        # ---------------------------------------------------------------- dense runs
        ref = model(**calls[0])[0]
        sync(dev)
        t = time.perf_counter()
        for c in calls:
            model(**c)
        sync(dev)
        dense_s = time.perf_counter() - t
        dense_peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        print(f"dense: {dense_s:.1f} s ({dense_s / len(calls):.2f} s per forward)", flush=True)

        # ---------------------------------------------------------------- calibration
        # warm-up (allocator, kernels) on a throw-away accumulator
        warm = CalibrationStats(block_size=a.block_size, blocks_per_kind=a.blocks_per_kind, tokens_per_block=a.tokens_per_block)
        with observe_attention(model, StatsObserver(warm), layout=layout):
            out = model(**calls[0])[0]
        if not torch.equal(out, ref):
            d = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)
            if not d < 1e-3:
                sys.exit(f"FAILED: the observed forward differs from the stock forward (max |diff| / max |ref| = {d:.3g}); "
                         "no timing reported")
            print(f"note: observed forward equals the stock one up to {d:.2g} (relative), not bitwise", flush=True)
        del warm
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t = time.perf_counter()
        stats = CalibrationStats(block_size=a.block_size, blocks_per_kind=a.blocks_per_kind, tokens_per_block=a.tokens_per_block)
        observer = StatsObserver(stats)
        with observe_attention(model, observer, layout=layout):
            for c in calls:
                model(**c)
        sync(dev)
        record_s = time.perf_counter() - t
        t = time.perf_counter()
        profile = fit_profile(stats, a.budget, load_cost_model(), metadata={"transformer_class": type(model).__name__})
        fit_s = time.perf_counter() - t
        calib_s = record_s + fit_s
        calib_peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0

    measured = {name: ls.calls for (name, _), ls in stats.layers.items()}
    if len(measured) != a.layers or any(v != len(calls) for v in measured.values()):
        sys.exit(f"FAILED: not every layer was measured on every call ({measured}); no timing reported")

    ratio = calib_s / dense_s
    s = profile.summary()
    gpu = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "isa_plugin": isa_plugin.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    print()
    print(f"{'':<28}{'minutes':>9}{'s/forward':>11}{'peak GiB':>10}")
    print(f"{'dense runs':<28}{dense_s / 60:>9.2f}{dense_s / len(calls):>11.2f}{dense_peak:>10.1f}")
    print(f"{'calibration (record + fit)':<28}{calib_s / 60:>9.2f}{record_s / len(calls):>11.2f}{calib_peak:>10.1f}")
    print(f"ratio calibration / dense: {ratio:.2f}x (acceptance: <= 2x)  [fit_profile {fit_s:.2f} s]")
    print(f"profile at budget {a.budget}: {s['layers']} layers, {s['dense_layers']} dense, mean predicted cost "
          f"{s['mean_relative_cost']:.3f} of dense (random weights: informational)")
    print(f"{gpu}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC")
    result = {
        "gpu": gpu, "versions": versions, "date": f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M}",
        "shape": {"layers": a.layers, "heads": a.heads, "head_dim": a.head_dim, "tokens": tokens, "text": a.text},
        "forwards": len(calls), "dense_s": dense_s, "record_s": record_s, "fit_s": fit_s, "calibration_s": calib_s,
        "ratio": ratio, "dense_peak_gib": dense_peak, "calibration_peak_gib": calib_peak,
        "sampling": {"blocks_per_kind": a.blocks_per_kind, "tokens_per_block": a.tokens_per_block, "block_size": a.block_size},
        "profile": s,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
