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
    d, i = r["dense"], r["isa"]
    print(f"attention: dense {d['attention_ms']:.1f} ms, ISA {i['attention_ms']:.1f} ms ({r['attention_speedup']:.2f}x)")
    print(f"end to end: dense {d['total_ms']:.1f} ms, ISA {i['total_ms']:.1f} ms ({r['total_speedup']:.2f}x)")
    print(f"fidelity of ISA vs dense: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}; "
          f"ISA calls {r['isa_calls']}, dense fallbacks {r['fallback_calls']}")
    if r["kernel_path"] == "reference":
        print("note: without a CUDA GPU, ISA runs its exact PyTorch reference, which is slower than dense attention; "
              "the speed-up needs the Triton kernels (run on a GPU)")
    print("wrote " + ", ".join(r["files"].values()))
    return 0
