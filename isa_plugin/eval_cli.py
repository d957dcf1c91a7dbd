"""``isa eval``: dense vs ISA on the user's own pipeline, profile and videos (fidelity, error, time)."""

from __future__ import annotations

import json
from pathlib import Path

from .cli import command


def _arguments(p) -> None:
    p.add_argument("--pipeline", required=True, metavar="PATH_OR_ID", help="the ICL pipeline (local folder or cached hub id)")
    p.add_argument("--adapter", help="adapter name the pipeline must be served by, e.g. wan-icl (checked against the "
                                     "pipeline class; an unknown name is answered with the list of adapters)")
    p.add_argument("--profile", required=True, metavar="YAML", help="threshold profile from isa calibrate")
    p.add_argument("--videos", required=True, nargs="+", metavar="VIDEO", help="videos (mp4/gif/frame folders)")
    p.add_argument("--prompts", nargs="+", default=[""], help="one prompt, or one per video")
    p.add_argument("--height", type=int, help="resize the videos to this height (default: the video's, fitted to the model)")
    p.add_argument("--width", type=int, help="resize the videos to this width (default: the video's, fitted to the model)")
    p.add_argument("--frames", type=int, help="use the first N frames of each video (default: all, fitted to the model)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of each edit (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by the dense and the ISA run (default 0)")
    p.add_argument("--device", help="cuda (or cuda:N) or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--json", metavar="PATH", default="isa_eval.json", help="where to write the results (default isa_eval.json)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars (each run's bar is labelled with the video, dense or ISA, and the run)")


@command("eval", help="compare ISA with dense attention on your pipeline and videos (PSNR/SSIM, error, time)",
         arguments=_arguments)
def evaluate(args) -> int:
    """Run each video with dense attention and with ISA (same seed); print a table and write JSON."""
    from .calibration.runners import runner_for
    from .calibration.video import read_video
    from .cli import CLIError
    from .evaluate import compare_edit
    from .pipeline_loading import load_pipeline
    from .profile import ThresholdProfile

    if args.steps < 1:
        raise CLIError(f"--steps {args.steps}: give at least 1 step")
    if len(args.prompts) not in (1, len(args.videos)):
        raise CLIError(f"--prompts: got {len(args.prompts)} prompts for {len(args.videos)} videos; give one, or one per video")
    for v in args.videos:
        if not Path(v).exists():
            raise CLIError(f"--videos {v}: no such file or folder")
    profile = ThresholdProfile.load(args.profile)
    pipe = load_pipeline(args.pipeline, args.adapter, args.device, args.dtype)
    profile.check_compatible(pipe.transformer)
    pipe.set_progress_bar_config(disable=args.no_progress)
    runner = runner_for(pipe)
    prompts = args.prompts * len(args.videos) if len(args.prompts) == 1 else args.prompts
    print("LPIPS: skipped (no LPIPS weights are bundled; PSNR and SSIM are reported)")
    rows = []
    for i, (path, prompt) in enumerate(zip(args.videos, prompts)):
        video, h, w, nf = runner.prepare(pipe, read_video(path), height=args.height, width=args.width, num_frames=args.frames)
        profile.check_run(height=h, width=w, frames=nf)
        r = compare_edit(pipe, profile, video, prompt, height=h, width=w, frames=nf, steps=args.steps, seed=args.seed,
                         label=f"video {i + 1}/{len(args.videos)}")
        rows.append({
            "video": path, "prompt": prompt, "height": h, "width": w, "frames": nf,
            "psnr": r["psnr"], "ssim": r["ssim"], "lpips": None,
            "dense": {"total_ms": r["dense"].total_ms, "attention_ms": r["dense"].attention_ms},
            "isa": {"total_ms": r["isa"].total_ms, "attention_ms": r["isa"].attention_ms},
            "layer_errors": r["layer_errors"], "isa_calls": r["isa_calls"], "fallback_calls": r["fallback_calls"],
            "fallbacks": r["fallbacks"],
        })
    print(f"{'video':<28} {'PSNR dB':>8} {'SSIM':>7} {'attn dense':>11} {'attn ISA':>9} {'total dense':>12} {'total ISA':>10} {'fallbacks':>9}")
    for r in rows:
        print(f"{Path(r['video']).name[:28]:<28} {r['psnr']:8.2f} {r['ssim']:7.4f} {r['dense']['attention_ms']:9.1f}ms "
              f"{r['isa']['attention_ms']:7.1f}ms {r['dense']['total_ms']:10.1f}ms {r['isa']['total_ms']:8.1f}ms {r['fallback_calls']:>9}")
    worst = {}
    for r in rows:
        for layer, e in r["layer_errors"].items():
            for kind, val in e.items():
                if val is not None:
                    worst[(layer, kind)] = max(worst.get((layer, kind), 0.0), val)
    if worst:
        print("per-layer attention-output error (rel. L1, worst over videos):")
        for layer in sorted({l for l, _ in worst}):
            print(f"  {layer:<24} target {worst.get((layer, 'target'), float('nan')):.4f}  "
                  f"context {worst.get((layer, 'context'), float('nan')):.4f}")
    Path(args.json).write_text(json.dumps({"profile": args.profile, "pipeline": args.pipeline, "results": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0
