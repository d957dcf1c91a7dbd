"""``isa inspect`` and ``isa validate``: read a threshold profile, print or plot it, check it against a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import CLIError, fmt, fmt_ratio, register_command
from .pipeline_loading import check_adapter, load_pipeline, load_transformer_skeleton, resolve_class


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile YAML")
    p.add_argument("--plot", metavar="PNG", help="draw ratios, errors and predicted cost per layer to this image")
    p.add_argument("--diagnostics", action="store_true",
                   help="also print per layer the context attention mass and the sharpness / Taylor-error rank correlation")


def _inspect(args) -> int:
    from .profile import ThresholdProfile

    prof = ThresholdProfile.load(args.profile)
    on = prof.calibrated_on
    b = prof.budget
    print(f"ISA threshold profile {args.profile} (schema {prof.schema_version})")
    print(f"  budget: {b['metric']} target {fmt(b['target'], True)}, context {fmt(b['context'], True)}; block size {prof.block_size}")
    if on:
        res = on.get("resolution")
        print(f"  calibrated on: {on.get('transformer_class', '?')} (config {on.get('config_hash', '?')}), "
              f"{res[0]}x{res[1] if res else '?'} px, {on.get('frames', '?')} frames, {on.get('steps', '?')} steps, "
              f"{on.get('num_samples', '?')} sample(s)" if res else
              f"  calibrated on: {on.get('transformer_class', '?')} (config {on.get('config_hash', '?')})")
        if on.get("versions"):
            print("  versions: " + ", ".join(f"{k} {v}" for k, v in on["versions"].items()))
    if prof.cost_model:
        print(f"  cost model: {prof.cost_model.get('source', prof.cost_model)}")
    header = f"{'layer':<28} {'bucket':>6} {'mode':>9} {'settings':<44} {'err_tgt':>8} {'err_ctx':>8} {'cost':>7}"
    print(header)
    print("-" * len(header))
    for name, settings in prof.layers.items():
        for bi, s in enumerate(settings):
            bucket = str(bi) if prof.num_buckets > 1 else "-"
            mode, values = ("dense", "") if s.dense else (s.mode, _settings_text(s))
            print(f"{name:<28} {bucket:>6} {mode:>9} {values:<44} {fmt(s.error_target, True):>8} {fmt(s.error_context, True):>8} "
                  f"{fmt(s.relative_cost, True):>7}")
    s = prof.summary()
    mc = s["mean_relative_cost"]
    speed = f", about {1 / mc:.2f}x fewer attention FLOPs" if mc else ""
    print(f"{s['layers']} layers, {s['dense_layers']} dense; mean predicted cost {fmt(mc, True)} of dense{speed}"
          + ("; * = mean of per-head values" if any(x.num_heads for ss in prof.layers.values() for x in ss if not x.dense) else ""))
    diag = on.get("diagnostics") or {}
    if args.diagnostics and diag:
        metrics = sorted({m for d in diag.values() for m in (d.get("sharpness_rank_corr") or {})})
        print(f"{'layer':<28} {'ctx mass':>9} " + " ".join(f"{'rho(' + m + ')':>16}" for m in metrics))
        for name, d in diag.items():
            rc = d.get("sharpness_rank_corr") or {}
            cells = [f"{rc[m]:>16.2f}" if m in rc else f"{'-':>16}" for m in metrics]
            print(f"{name:<28} {d.get('context_mass', float('nan')):>9.3f} " + " ".join(cells))
    if args.plot:
        _plot(prof, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot(prof, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = prof.layer_names
    x = list(range(len(names)))
    mean = lambda v: sum(v) / len(v) if isinstance(v, tuple) else v  # noqa: E731
    first = [prof.layers[n][0] for n in names]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.25 * len(names) + 3), 8), sharex=True)
    fields = list(dict.fromkeys(k for s in first if not s.dense for k in s.config.selection.profile_fields
                                if isinstance(mean(getattr(s.config.settings, k)), float)))
    for r in fields:
        ys = [1.0 if s.dense else (mean(getattr(s.config.settings, r)) if r in s.config.selection.profile_fields else float("nan"))
              for s in first]
        axes[0].plot(x, ys, marker="o", ms=3, label=r)
    axes[0].set_ylabel("setting (dense = 1)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(x, [s.error_target or 0 for s in first], marker="o", ms=3, label="target queries")
    axes[1].plot(x, [s.error_context or 0 for s in first], marker="s", ms=3, label="context queries")
    axes[1].axhline(prof.budget["target"], color="C0", ls="--", lw=0.8)
    axes[1].axhline(prof.budget["context"], color="C1", ls=":", lw=0.8)
    axes[1].set_ylabel("rel. L1 error")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].bar(x, [s.relative_cost if s.relative_cost is not None else 1.0 for s in first], color=["0.6" if s.dense else "C2" for s in first])
    axes[2].set_ylabel("predicted cost / dense")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(names, rotation=90, fontsize=6)
    fig.suptitle(f"ISA profile: {prof.calibrated_on.get('transformer_class', '')} budget {prof.budget['target']:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ================================================================================= validate
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile YAML")
    p.add_argument("--pipeline", required=True, help="pipeline folder or hub id whose transformer the profile must fit")
    p.add_argument("--adapter", help="isa-plugin adapter serving the pipeline")
    p.add_argument("--height", type=int, help="intended run height (warns when it differs from the calibrated one)")
    p.add_argument("--width", type=int, help="intended run width")
    p.add_argument("--frames", type=int, help="intended run frame count")
    p.add_argument("--device", default="cpu", help="where to load the pipeline when it has to be loaded (default cpu)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")


def _validate(args) -> int:
    import warnings

    from .adapters import family_for
    from .profile import ThresholdProfile

    prof = ThresholdProfile.load(args.profile)
    tr = None
    if Path(args.pipeline).is_dir():
        tr = load_transformer_skeleton(args.pipeline)  # config only: no weights are read
        if tr is not None and args.adapter is not None:
            import json

            check_adapter(resolve_class(json.loads((Path(args.pipeline) / "model_index.json").read_text())["_class_name"]), args.adapter)
    if tr is None:
        tr = load_pipeline(args.pipeline, args.adapter, args.device, args.dtype).transformer
    try:
        names = list(family_for(tr).self_attention_layers(tr))
    except TypeError as e:
        raise CLIError(str(e)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a size warning shown before in this process still counts here
        try:
            prof.check_compatible(tr, layer_names=names, height=args.height, width=args.width, frames=args.frames)
        except ValueError as e:
            raise CLIError(f"profile does not fit this model: {e}", code=1) from None
    s = prof.summary()
    print(f"OK: {args.profile} fits {type(tr).__name__} ({len(names)} attention layers, {s['dense_layers']} kept dense)")
    return 0


register_command("inspect", _inspect, help="print a profile as a per-layer table (and plot it)", arguments=_inspect_args)
register_command("validate", _validate, help="check a profile against a model", arguments=_validate_args)


def _settings_text(s) -> str:
    """A setting's profile fields as ``name=value`` (per-head values as their mean with ``*``)."""
    mode = s.config.selection
    parts = []
    for k in mode.profile_fields + mode.optional_profile_fields:
        v = getattr(s.config.settings, k)
        if v is not None:
            parts.append(f"{k}={fmt_ratio(v) if not isinstance(v, str) else v}")
    return " ".join(parts)
