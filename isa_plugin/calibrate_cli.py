"""``isa calibrate``: run a pipeline densely on sample videos or images and write a threshold profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import CLIError, budget_arg, fmt, register_command
from .pipeline_loading import load_pipeline


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, help="pipeline folder (save_pretrained) or hub id; its family is detected")
    p.add_argument("--adapter", help="isa-plugin adapter serving the pipeline (default: detected from the pipeline class; "
                                     "checked against it)")
    p.add_argument("--inputs", "--videos", dest="inputs", nargs="+", metavar="INPUT",
                   help="calibration samples: video files (mp4/gif/webm), images, or folders of frames; what each is for the "
                        "pipeline is listed below (default: the bundled sample videos)")
    p.add_argument("--prompts", nargs="*", default=None, metavar="PROMPT", help="one prompt, or one per sample (default: empty)")
    p.add_argument("--budget", type=budget_arg(), default=0.05, help="relative L1 error budget of the attention output, in (0, 1) (default 0.05)")
    p.add_argument("--context-budget", type=budget_arg("context_budget"), default=None, help="separate budget for context-query outputs, in (0, 1) (default: --budget)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the schedule (default 10; the run stops after the last measured step)")
    p.add_argument("--calib-steps", type=int, default=4, help="steps measured, spread over the schedule (default 4)")
    p.add_argument("--height", type=int, help="resize videos to this height")
    p.add_argument("--width", type=int, help="resize videos to this width")
    p.add_argument("--frames", type=int, help="use the first N frames of each video")
    p.add_argument("--out", required=True, help="profile to write (YAML; per-head values go to a .safetensors sidecar)")
    p.add_argument("--block-size", type=int, default=64, help="ISA block size (default 64)")
    p.add_argument("--blocks-per-kind", type=int, default=48, help="query blocks sampled per kind and call (default 48)")
    p.add_argument("--tokens-per-block", type=int, default=16, help="tokens sampled per sampled block (default 16)")
    p.add_argument("--timestep-buckets", type=int, default=1, help="separate settings per timestep bucket (default 1)")
    p.add_argument("--bucket-budgets", type=budget_arg("bucket_budgets"), nargs="+", default=None, metavar="B",
                   help="one budget per timestep bucket, from the least noisy to the noisiest (as many as "
                        "--timestep-buckets; replaces --budget there, e.g. 0.03 0.12: more error at high noise)")
    p.add_argument("--per-head", choices=("auto", "always", "off"), default="auto", help="per-head ratios (default: where they pay)")
    p.add_argument("--margin", type=float, default=0.85, help="fit to margin x budget (sampling noise; default 0.85)")
    p.add_argument("--mode", dest="modes", action="append", metavar="MODE",
                   help="a selection mode to measure; repeat for several (default: fixed); each layer keeps the cheapest "
                        "mode within budget. Modes: " + ", ".join(_mode_names()))
    p.add_argument("--adaptive", action="store_true",
                   help="short for --mode fixed --mode adaptive (docs/ADAPTIVE.md)")
    p.add_argument("--plan-reuse", type=int, default=1, metavar="K",
                   help="also measure plans kept for up to K denoising steps (one more dense run of every step on the samples) "
                        "and give each layer the largest plan_reuse <= K within margin x budget (default 1: plan every step)")
    p.add_argument("--cost-model", help="kernel cost model JSON (default: isa_plugin/kernels/cost_model.json if present)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale passed to the pipeline")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-stats", help="also save the raw statistics (torch.save) for refitting")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mode_names():
    from .selection import registered_modes

    return list(registered_modes())


def _calibrate(args) -> int:
    import time

    from .calibration.cost import load_cost_model
    from .calibration.fit import fit_profile, parse_budget
    from .calibration.recorder import record

    if args.steps < 1 or args.calib_steps < 1:
        raise CLIError("--steps and --calib-steps must be at least 1")
    if args.plan_reuse < 1:
        raise CLIError(f"--plan-reuse {args.plan_reuse} must be at least 1 (1: plan every step)")
    budget = parse_budget((args.budget, args.context_budget if args.context_budget is not None else args.budget))
    if args.bucket_budgets is not None and len(args.bucket_budgets) != args.timestep_buckets:
        raise CLIError(f"--bucket-budgets gives {len(args.bucket_budgets)} budget(s) for --timestep-buckets "
                       f"{args.timestep_buckets}; give one per bucket, from the least noisy to the noisiest")
    if args.inputs is None:
        from .calibration.video import sample_media_paths

        args.inputs = [str(p) for p in sample_media_paths()]
    for v in args.inputs:
        if not Path(v).exists():
            raise CLIError(f"input {v!r} does not exist")
    cost_model = load_cost_model(args.cost_model) if args.cost_model else load_cost_model()
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {args.out} is a folder; give a file name such as profile.yaml")
    grid = None
    if args.modes or args.adaptive:
        from .calibration.statistics import Grid
        from .selection import DEFAULT_MODE

        modes = list(dict.fromkeys((args.modes or []) + ([DEFAULT_MODE, "adaptive"] if args.adaptive else [])))
        try:
            grid = Grid.defaults(modes, args.block_size)
        except ValueError as e:
            raise CLIError(str(e)) from None
    pipe = load_pipeline(args.pipeline, args.adapter, args.device, args.dtype)
    extra = {}
    if args.guidance_scale is not None:
        extra["guidance_scale"] = args.guidance_scale
    t0 = time.perf_counter()
    from .calibration.runners import runner_for, runner_named

    try:
        runner = runner_named(args.adapter) if args.adapter else runner_for(pipe)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    stats, meta = record(
        pipe, args.inputs, args.prompts or None, adapter=runner.adapter, steps=args.steps, calib_steps=args.calib_steps, height=args.height,
        width=args.width, frames=args.frames, block_size=args.block_size, blocks_per_kind=args.blocks_per_kind,
        tokens_per_block=args.tokens_per_block, timestep_buckets=args.timestep_buckets, seed=args.seed,
        progress=not args.no_progress, pipeline_kwargs=extra, grid=grid,
    )
    meta["pipeline"] = args.pipeline
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    per_head = {"auto": "auto", "always": "always", "off": False}[args.per_head]
    profile = fit_profile(stats, budget, cost_model, per_head=per_head, margin=args.margin, metadata=meta,
                          bucket_budgets=args.bucket_budgets)
    if args.plan_reuse > 1:
        from .calibration.plan_reuse import choose_plan_reuse, measure_plan_reuse

        reuse = measure_plan_reuse(pipe, profile, args.inputs, args.prompts or None, max_reuse=args.plan_reuse, steps=args.steps,
                                   adapter=runner.adapter, height=args.height, width=args.width, frames=args.frames,
                                   seed=args.seed, pipeline_kwargs=extra, progress=not args.no_progress)
        print("plan reuse: worst relative L1 error (target / context) of plans kept for 0 .. K-1 steps")
        print(reuse.table())
        profile = choose_plan_reuse(profile, reuse, budget, margin=args.margin)
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        profile.calibrated_on["seconds"] = meta["seconds"]
    profile.save(out)
    if args.save_stats:
        import torch

        torch.save(stats.state_dict(), args.save_stats)
    s = profile.summary()
    _print_held_out(profile)
    print(f"wrote {out}: {s['layers']} layers, {s['dense_layers']} dense, predicted attention cost "
          f"{fmt(s['mean_relative_cost'], True)} of dense, calibrated in {meta['seconds']:.1f} s")
    return 0


def _print_held_out(profile) -> None:
    """The held-out check per layer (predicted vs leave-one-sample-out error), and a warning per layer over budget."""
    checks = profile.calibrated_on.get("held_out") or {}
    bt, bc = profile.budget["target"], profile.budget["context"]
    header = f"{'layer':<36} {'bucket':>6} {'pred_tgt':>8} {'held_tgt':>8} {'pred_ctx':>8} {'held_ctx':>8} {'margin':>6}"
    print(f"held-out check (leave one sample out; budget target {fmt(bt, True)}, context {fmt(bc, True)}):")
    print(header)
    misses = []
    for name, per_bucket in checks.items():
        for bi, c in enumerate(per_bucket):
            if c is None:
                continue
            ht, hc = c.get("held_out_target"), c.get("held_out_context")
            print(f"{name:<36} {bi:>6} {fmt(c.get('predicted_target'), True):>8} {fmt(ht, True):>8} "
                  f"{fmt(c.get('predicted_context'), True):>8} {fmt(hc, True):>8} {c.get('margin', 0):>6.3f}")
            if ht is None:
                misses.append(f"{name}: one sample only, no held-out check (give two or more --inputs)")
            elif ht > bt or hc > bc:
                misses.append(f"{name} bucket {bi}: held-out error {fmt(ht, True)} / {fmt(hc, True)} exceeds the budget")
    for m in dict.fromkeys(misses):
        print(f"isa: warning: {m}", file=sys.stderr)


def _calibrate_epilog() -> str:
    from .calibration.runners import help_text

    return "pipelines (detected from the saved pipeline; --adapter NAME overrides) and what one --inputs sample is for each:\n" + help_text()


register_command("calibrate", _calibrate, help="calibrate ISA ratios on sample videos or images and write a profile",
                 arguments=_calibrate_args, epilog=_calibrate_epilog(),
                 description="Run the pipeline densely on calibration samples, measure ISA's error per layer and head (every "
                             "transformer of the pipeline), and write the cheapest per-layer ratios whose leave-one-sample-out "
                             "error is within the budget.")


