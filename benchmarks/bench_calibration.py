"""Benchmark: time of an ISA calibration pass vs the dense transformer runs it observes.

Acceptance: calibrating on 2 videos x 4 timesteps takes at most 2x the time of the dense runs themselves, for
a Wan-14B-shaped transformer (``--family wan``, the default) and for an LTX-2-shaped one (``--family ltx2``).
Weights are random (bf16 on a GPU); no weights are read.

Shapes (defaults):

- ``wan``: Wan 14B (40 heads x head_dim 128, ffn 13824, 40 layers), 480p 81-frame in-context edit: 21 target
  + 21 context latent frames of 30 x 52 tokens = 65,520 tokens per call, 512 text tokens. Wan runs cond and
  uncond as separate batch-1 calls: 2 videos x 4 timesteps x 2 = 16 forwards.
- ``ltx2``: LTX-2 (32 heads x 128 video, 32 x 64 audio, caption channels 3840; 16 of its 48 layers) in
  ``LTX2InContextPipeline``'s call at its default size, 512 x 768 px, 121 frames: 16 latent frames of 16 x 24
  = 6,144 noisy tokens followed by an IC-LoRA reference video of the same size (6,144 tokens, timestep 0),
  126 audio tokens (5 s), 1,024 text tokens. The pipeline batches cond and uncond: 2 videos x 4 timesteps =
  8 forwards of batch 2.

Measured (wall time with CUDA synchronisation, one pass each after one warm-up forward of each kind):

- dense: the forwards with the stock diffusers processors;
- calibration: the same forwards under :func:`isa_plugin.adapters.observe_attention` with the
  :class:`~isa_plugin.calibration.recorder.StatsObserver` measuring every self-attention call (sampled
  query blocks, exact dense rows, the whole (metric, α_s, α_f, α_ns) grid; statistics kept per video, as
  ``isa calibrate`` does), plus ``fit_profile`` with its leave-one-video-out check.

Printed: a table (seconds, per-forward seconds, peak memory), the ratio and the fitted profile's summary;
``--json PATH`` writes the same. The exit status is 1 when the ratio exceeds 2 on a GPU (a CPU run is a smoke
test: its times are informational).

Correctness gate (no timing is reported when it fails): the observed forward's output must equal the stock
forward's output (bitwise, or within 1e-3 of its largest magnitude: the observer must not change the model's
computation), and every layer must have been measured on every batch entry of every call.

Wan work per layer call at the default shape (48 blocks x 16 tokens per kind): about 2 TFLOP of measurement
(TF32 matmuls; 2% of the dense attention's 88 TFLOP) and about 200 GB of memory traffic (score and per-block
numerator buffers), i.e. roughly 0.1 s on an H100 against about 0.23 s for the dense block. LTX-2 calls are
5x shorter (quadratic attention 28x cheaper per entry), so the fixed part of the measurement weighs more.

Memory: Wan 14B bf16 weights are about 28 GB; 16 LTX-2 layers are 6.5 B parameters, 12 GiB in bf16 (all 48:
18.9 B); the calibration adds a few GB of transient buffers per layer. Runtime on one H100: Wan at 40 layers
about 6 minutes (``--layers 10`` for a quick run: the ratio does not depend on the layer count, every block
is identical).

Examples:
    python benchmarks/bench_calibration.py --layers 10 --json wan.json       # Wan 14B shape, 10 layers
    python benchmarks/bench_calibration.py --family ltx2 --json ltx2.json    # LTX-2 shape, 16 layers
    python benchmarks/bench_calibration.py --family ltx2 --tiny              # CPU smoke test, seconds
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

from wan_model import build_ltx2_transformer, build_wan_transformer  # noqa: E402
import isa_plugin  # noqa: E402
from isa_plugin.adapters import observe_attention  # noqa: E402
from isa_plugin.adapters.families.wan import WanICLLayout  # noqa: E402
from isa_plugin.calibration import CalibrationStats, fit_profile, load_cost_model  # noqa: E402
from isa_plugin.calibration.statistics import Grid  # noqa: E402
from isa_plugin.calibration.recorder import StatsObserver  # noqa: E402

#: per family: the realistic shape, and a CPU smoke-test shape (``--tiny``). Sizes are latent units: Wan's
#: height/width are before its 2x2 patch; LTX-2's (patch 1) are tokens. frames: noisy latent frames;
#: context_frames: the context (Wan) / IC-LoRA reference (LTX-2) latent frames.
SHAPES = {
    "wan": {
        "full": dict(layers=40, heads=40, head_dim=128, ffn=13824, text_dim=4096, text=512, frames=21, context_frames=21,
                     height=60, width=104),
        "tiny": dict(layers=1, heads=2, head_dim=32, ffn=64, text_dim=32, text=8, frames=2, context_frames=2, height=8,
                     width=8, block_size=8, blocks_per_kind=4, tokens_per_block=4),
    },
    "ltx2": {
        "full": dict(layers=16, heads=32, head_dim=128, audio_heads=32, audio_head_dim=64, text_dim=3840, text=1024,
                     frames=16, context_frames=16, height=16, width=24, audio=126),
        "tiny": dict(layers=1, heads=2, head_dim=32, audio_heads=2, audio_head_dim=8, text_dim=32, text=8, frames=2,
                     context_frames=2, height=4, width=4, audio=4, block_size=8, blocks_per_kind=4, tokens_per_block=4),
    },
}
SAMPLING = dict(block_size=64, blocks_per_kind=48, tokens_per_block=16)


# ------------------------------------------------------------------------------------ wan
def wan_setup(a, device, dtype):
    """The model, its calls (per video, per sampled timestep, cond and uncond) and the layout to observe."""
    model = build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=a.layers, text_dim=a.text_dim,
                                  device=device, dtype=dtype)
    calls = []
    F = a.frames + a.context_frames
    for vid in range(a.videos):
        g = torch.Generator(device=device).manual_seed(100 + vid)
        x = torch.randn(1, 16, F, a.height, a.width, generator=g, device=device, dtype=dtype)
        cond = torch.randn(1, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
        uncond = torch.randn(1, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
        for t in timesteps(a):
            for e in (cond, uncond):
                calls.append((vid, dict(hidden_states=x, timestep=torch.tensor([t], device=device), encoder_hidden_states=e,
                                        return_dict=False)))
    tokens = F * (a.height // 2) * (a.width // 2)
    return model, calls, WanICLLayout(context_frames=a.context_frames), tokens


# ------------------------------------------------------------------------------------ ltx-2
def ltx2_setup(a, device, dtype):
    """As :func:`wan_setup` for LTX-2: one call per video and timestep, cond and uncond batched (batch 2).

    The call is what ``LTX2InContextPipeline`` makes: noisy tokens on the (frames, height, width) grid, then
    the reference video's tokens on the same grid (per-token timestep 0), audio latents, text embeddings.
    The adapter reads the layout from the call (target: the grid's tokens; context: the appended ones).
    """
    model = build_ltx2_transformer(heads=a.heads, head_dim=a.head_dim, audio_heads=a.audio_heads,
                                   audio_head_dim=a.audio_head_dim, layers=a.layers, text_dim=a.text_dim, device=device,
                                   dtype=dtype)
    B = 2
    n_noisy = a.frames * a.height * a.width
    n_ref = a.context_frames * a.height * a.width
    coords = torch.cat([model.rope.prepare_video_coords(B, a.frames, a.height, a.width, device),
                        model.rope.prepare_video_coords(B, a.context_frames, a.height, a.width, device)], dim=2)
    calls = []
    for vid in range(a.videos):
        g = torch.Generator(device=device).manual_seed(100 + vid)
        noisy = torch.randn(1, n_noisy, 128, generator=g, device=device, dtype=dtype)
        ref = torch.randn(1, n_ref, 128, generator=g, device=device, dtype=dtype)
        audio = torch.randn(1, a.audio, 128, generator=g, device=device, dtype=dtype)
        text = torch.randn(B, a.text, a.text_dim, generator=g, device=device, dtype=dtype)  # [uncond, cond]
        for t in timesteps(a):
            vt = torch.cat([torch.full((B, n_noisy), t, device=device), torch.zeros(B, n_ref, device=device)], dim=1)
            at = torch.full((B,), t, device=device)
            calls.append((vid, dict(
                hidden_states=torch.cat([noisy, ref], dim=1).expand(B, -1, -1), audio_hidden_states=audio.expand(B, -1, -1),
                encoder_hidden_states=text, audio_encoder_hidden_states=text, timestep=vt, audio_timestep=at,
                sigma=at, audio_sigma=at, encoder_attention_mask=torch.ones(B, a.text, device=device),
                audio_encoder_attention_mask=torch.ones(B, a.text, device=device), num_frames=a.frames, height=a.height,
                width=a.width, audio_num_frames=a.audio, video_coords=coords, return_dict=False)))
    return model, calls, None, n_noisy + n_ref


SETUPS = {"wan": wan_setup, "ltx2": ltx2_setup}


def timesteps(a):
    return torch.linspace(999, 50, a.timesteps).round().tolist()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def batch_entries(calls) -> int:
    return sum(c["hidden_states"].shape[0] for _, c in calls)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(SHAPES), default="wan")
    ap.add_argument("--tiny", action="store_true", help="the family's CPU smoke-test shape (runs in seconds)")
    for name in sorted({k for f in SHAPES.values() for k in f["full"]}):
        fams = [f for f in sorted(SHAPES) if name in SHAPES[f]["full"]]
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help="; ".join(f"{f} default {SHAPES[f]['full'][name]}" for f in fams))
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--timesteps", type=int, default=4)
    for name in SAMPLING:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {SAMPLING[name]} (smaller with --tiny)")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--mode", dest="modes", action="append", metavar="MODE",
                    help="a selection mode to measure, as isa calibrate --mode; repeat for several (default: fixed)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    shape = SHAPES[a.family]["tiny" if a.tiny else "full"]
    for name in {k for f in SHAPES.values() for k in f["full"]} - set(shape):
        if getattr(a, name) is not None:
            ap.error(f"--{name.replace('_', '-')} does not apply to --family {a.family}")
    for name, value in {**SAMPLING, **shape}.items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    return a


def main(argv=None):
    a = parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --tiny (or --device cpu) for a smoke test")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    t0 = time.perf_counter()
    model, calls, layout, tokens = SETUPS[a.family](a, dev, dtype)
    entries = batch_entries(calls)
    params = sum(p.numel() for p in model.parameters())
    print(f"{a.family}: {type(model).__name__}, {a.layers} layers x {a.heads} heads x {a.head_dim}, {params / 1e6:,.0f} M "
          f"parameters; {tokens} self-attention tokens per entry, {len(calls)} forwards ({entries} batch entries: "
          f"{a.videos} videos x {a.timesteps} timesteps x 2 CFG branches); built in {time.perf_counter() - t0:.1f} s", flush=True)
    sampling = dict(block_size=a.block_size, blocks_per_kind=a.blocks_per_kind, tokens_per_block=a.tokens_per_block)
    grid = Grid.defaults(a.modes or ["fixed"], a.block_size)
    print(f"modes measured: {', '.join(grid.modes)}", flush=True)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with torch.no_grad():
        # ---------------------------------------------------------------- dense runs
        ref = model(**calls[0][1])[0]
        sync(dev)
        t = time.perf_counter()
        for _, c in calls:
            model(**c)
        sync(dev)
        dense_s = time.perf_counter() - t
        dense_peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        print(f"dense: {dense_s:.2f} s ({dense_s / len(calls):.3f} s per forward)", flush=True)

        # ---------------------------------------------------------------- calibration
        # warm-up (allocator, kernels) on a throw-away accumulator; the observed output must be the stock one
        warm = CalibrationStats(grid, **sampling)
        with observe_attention(model, StatsObserver(warm), layout=layout):
            out = model(**calls[0][1])[0]
        if not warm.layers:
            sys.exit("FAILED: the warm-up forward measured no attention call (layout unknown); no timing reported")
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
        stats = CalibrationStats(grid, **sampling)
        observer = StatsObserver(stats)
        with observe_attention(model, observer, layout=layout):
            for vid, c in calls:
                if observer.sample != vid:
                    observer.new_run(sample=vid)  # statistics per video, for the fit's held-out check
                model(**c)
        sync(dev)
        record_s = time.perf_counter() - t
        t = time.perf_counter()
        profile = fit_profile(stats, a.budget, load_cost_model(), metadata={"transformer_class": type(model).__name__})
        fit_s = time.perf_counter() - t
        calib_s = record_s + fit_s
        calib_peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0

    measured = {name: ls.calls for (name, _), ls in stats.layers.items()}
    if len(measured) != a.layers or any(v != entries for v in measured.values()):
        sys.exit(f"FAILED: not every layer was measured on every batch entry ({measured}, expected {entries} each over "
                 f"{a.layers} layers); no timing reported")

    ratio = calib_s / dense_s
    s = profile.summary()
    held = [c for per in profile.calibrated_on["held_out"].values() for c in per if c]
    worst_held = max((max(c["held_out_target"] or 0, c["held_out_context"] or 0) for c in held), default=None)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "isa_plugin": isa_plugin.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    n = len(calls)
    print()
    print(f"{'':<28}{'seconds':>9}{'s/forward':>11}{'peak GiB':>10}")
    print(f"{'dense runs':<28}{dense_s:>9.2f}{dense_s / n:>11.3f}{dense_peak:>10.1f}")
    print(f"{'calibration (record + fit)':<28}{calib_s:>9.2f}{record_s / n:>11.3f}{calib_peak:>10.1f}")
    note = "(acceptance: <= 2x)" if dev == "cuda" else "(CPU smoke test: informational, no speed claim)"
    print(f"ratio calibration / dense: {ratio:.2f}x {note}  [fit_profile with the held-out check {fit_s:.2f} s]")
    print(f"profile at budget {a.budget}: {s['layers']} layers, {s['dense_layers']} dense, mean predicted cost "
          f"{s['mean_relative_cost']:.3f} of dense, worst held-out error "
          f"{'-' if worst_held is None else f'{worst_held:.4f}'} (random weights: informational)")
    print(f"{gpu}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC")
    result = {
        "family": a.family, "tiny": a.tiny, "device": gpu, "versions": versions,
        "date": f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M}", "transformer_class": type(model).__name__,
        "shape": {k: getattr(a, k) for k in SHAPES[a.family]["full"]} | {"tokens": tokens, "parameters": params},
        "forwards": n, "batch_entries": entries, "dense_s": dense_s, "record_s": record_s, "fit_s": fit_s,
        "calibration_s": calib_s, "ratio": ratio, "dense_peak_gib": dense_peak, "calibration_peak_gib": calib_peak,
        "sampling": sampling, "modes": sorted(grid.modes), "profile": s, "worst_held_out_error": worst_held,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ratio <= 2.0 or dev != "cuda" else 1


if __name__ == "__main__":
    sys.exit(main())
