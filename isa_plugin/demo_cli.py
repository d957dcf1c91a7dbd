"""``isa demo``: the end-to-end demo (see :func:`isa_plugin.demo.run_demo`)."""

from __future__ import annotations

from .cli import budget_arg, command


def _arguments(p) -> None:
    p.add_argument("--out", default="isa_demo", metavar="DIR", help="output folder (default: ./isa_demo)")
    p.add_argument("--size", default="tiny", help="random-pipeline preset: tiny (CPU), small, large (GPU); default tiny")
    p.add_argument("--model", metavar="PATH_OR_ID", help="a WanInContextEditPipeline or LIVEditorPipeline folder instead of random weights")
    p.add_argument("--device", help="cuda (or cuda:N) or cpu (default: cuda when available)")
    p.add_argument("--budget", type=budget_arg(), default=0.05, help="attention-output error budget, relative L1 in (0, 1) (default 0.05)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", metavar="PATH", help="video or frame folder to edit (default: the bundled sample)")
    p.add_argument("--prompt", default="turn the scene into a snowy winter evening")


@command("demo", help="calibrate, then edit a video with dense attention and with ISA, and compare", arguments=_arguments)
def demo(args) -> int:
    """Calibrate a profile, load it, edit with dense attention and with ISA, report fidelity and time."""
    from .cli import CLIError
    from .demo import run_demo
    from .devices import resolve_device

    resolve_device(args.device, name="--device")  # before anything is built
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps {args.steps}: give at least 1 step")
    r = run_demo(args.out, size=args.size, model=args.model, device=args.device, budget=args.budget, steps=args.steps,
                 seed=args.seed, prompt=args.prompt, video=args.video, progress=True)
    print(f"model: {r['model']} on {r['device']} ({r['tokens_per_call']} tokens per attention call, {r['steps']} steps)")
    print(f"calibration: {r['calibration_s']:.1f} s, budget {r['budget']}; "
          f"{r['profile_summary']['dense_layers']}/{r['profile_summary']['layers']} layers kept dense")
    print(f"{'layer':<22} {'α_s':>6} {'α_f':>6} {'α_ns':>6} {'err tgt':>8} {'err ctx':>8} {'cost':>6} {'ISA':>4} fallbacks")
    fmt = lambda x: f"{x:8.4f}" if isinstance(x, float) else f"{'-':>8}"
    for name, l in r["layers"].items():
        cost = l["predicted_relative_cost"]
        print(f"{name:<22} {l['mean_alpha_s']:6.3f} {l['mean_alpha_f']:6.3f} {l['mean_alpha_ns']:6.3f} "
              f"{fmt(l['measured_error_target'])} {fmt(l['measured_error_context'])} "
              f"{(f'{cost:6.3f}' if cost is not None else '     -')} {l['isa_calls']:>4} {l['fallbacks'] or ''}")
    t = r["timing"]
    d, i = t["dense"], t["isa"]
    span = lambda xs: f"{min(xs):.0f}-{max(xs):.0f}"  # noqa: E731
    print(f"warm times, median of {t['repeats']} runs each, alternated dense/ISA after a warm-up of both "
          f"(range in brackets):")
    print(f"  self-attention: dense {d['median_attention_ms']:.1f} ms ({span(d['attention_ms'])}), "
          f"ISA {i['median_attention_ms']:.1f} ms ({span(i['attention_ms'])}): {t['attention_speedup']:.2f}x")
    e2e = (f"{t['total_speedup']:.2f}x" if t["total_consistent"] else
           "the difference is run-to-run noise (the rest of the pipeline is the same work in both runs)")
    print(f"  end to end:     dense {d['median_total_ms']:.0f} ms ({span(d['total_ms'])}), "
          f"ISA {i['median_total_ms']:.0f} ms ({span(i['total_ms'])}): {e2e}")
    print(f"  {t['summary']}")
    print(f"fidelity of ISA vs dense: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}; "
          f"ISA calls {r['isa_calls']}, dense fallbacks {r['fallback_calls']}")
    s = r["structured_call"]
    sp, plan = s["spec"], s["plan"]
    print(f"one ICL attention call at a realistic grid ({sp['tokens_per_call']:,} tokens: {sp['frames']} frames of "
          f"{sp['height']}x{sp['width']} per video, {sp['heads']} heads of {sp['head_dim']}; synthetic, structured):")
    print(f"  default ratios' plan ({s['layer']}): {sum(plan['per_head']['kept_context_blocks'])}/"
          f"{plan['blocks']['context'] * sp['heads']} context blocks kept, "
          f"{sum(plan['per_head']['full_rows_target']) + sum(plan['per_head']['full_rows_context'])}/"
          f"{(plan['blocks']['target'] + plan['blocks']['context']) * sp['heads']} query blocks exact (all heads)")
    print(f"  held-out error (worst layer, rel. L1) and FLOPs; calibrated for budget {s['budget']} on "
          f"{len(s['calibration_samples'])} samples, evaluated on {len(s['held_out_samples'])} other:")
    w = max(len(x["label"]) for x in s["settings"].values())
    print(f"  {'setting':<{w}} {'err tgt':>8} {'err ctx':>8} {'FLOPs vs dense':>15} {'GFLOP':>6}")
    for x in s["settings"].values():
        print(f"  {x['label']:<{w}} {x['error_target']:8.4f} {x['error_context']:8.4f} {x['relative_cost']:15.1%} "
              f"{x['gflop_per_call']:6.2f}")
    g = r["gpu_speed"]
    shown = g[g["shown"]]
    how = "measured here" if g["shown"] == "measured" else f"recorded in {shown['source']}"
    print(f"GPU speed of one ISA attention call ({how}: {shown['card']}, {shown['date']}, torch "
          f"{shown['versions'].get('torch', '?')}, bf16, head_dim {shown['head_dim']}, default ratios):")
    for row in shown["rows"]:
        print(f"  {row['heads']} heads, {row['tokens']:>6,} tokens: SDPA {row['dense_ms']:7.2f} ms, ISA {row['isa_ms']:6.2f} ms, "
              f"{row['speedup']:.2f}x")
    print("wrote " + ", ".join(r["files"].values()))
    return 0
