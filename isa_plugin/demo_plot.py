"""The demo's ``plot.png``: the tiny pipeline's edit (top row) and ISA at a realistic size (bottom row).

Top: ratios and attention-output errors per layer of the calibrated profile, and the warm times of the dense
and the ISA edit (self-attention and the rest of the pipeline, median of alternated runs). Bottom: the plan of
the default ratios on a structured 2,048-token ICL attention call, the held-out error and FLOPs of the default
ratios and of calibrated profiles, and the GPU speed of the kernels (recorded with card and date, or measured
on this machine's GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

__all__ = ["build_figure", "plot_report"]

#: colours of the plan panel: a dropped context block, a kept block entering as pseudo-keys, an exact block
PLAN_COLOURS = ("#f4f4f4", "#9ecae1", "#08519c")
SETTING_COLOURS = {"default": "C3", "fixed": "C0", "adaptive": "C2"}
SETTING_SHORT = {"default": "default ratios, not calibrated", "fixed": "calibrated: fixed mode",
                 "adaptive": "calibrated: fixed + adaptive modes"}


def _layers_panels(axes, report: Dict[str, Any]) -> None:
    layers = report["layers"]
    names = list(layers)
    x = range(len(names))
    for key, label in (("alpha_s", "α_s (context kept)"), ("alpha_f", "α_f (exact queries)"), ("alpha_ns", "α_ns (exact keys)")):
        axes[0].plot(x, [layers[n]["mean_" + key] for n in names], marker="o", label=label)
    axes[0].set_title("calibrated ratios per layer (1 = dense)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    for key, label in (("error_target", "target queries"), ("error_context", "context queries")):
        axes[1].plot(x, [layers[n].get("measured_" + key) or 0.0 for n in names], marker="o", label=label)
    axes[1].axhline(report["budget"], color="gray", ls="--", label="budget")
    axes[1].set_title("attention-output error in the ISA edit (rel. L1)")
    axes[1].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, fontsize=7, ha="right")


def _times_panel(ax, report: Dict[str, Any]) -> None:
    t = report["timing"]
    runs = ("dense", "isa")
    att = [t[r]["median_attention_ms"] for r in runs]
    rest = [t[r]["median_total_ms"] - t[r]["median_attention_ms"] for r in runs]
    labels = ["dense", "ISA"]
    ax.bar(labels, att, color=["C0", "C1"], label="self-attention")
    ax.bar(labels, rest, bottom=att, color=["C0", "C1"], alpha=0.35, label="rest of the pipeline")
    for i, r in enumerate(runs):
        ax.scatter([i] * len(t[r]["total_ms"]), t[r]["total_ms"], color="k", s=10, zorder=3,
                   label="each run (total)" if i == 0 else None)
        ax.text(i, att[i] + rest[i], f"attention {att[i]:.0f} ms\ntotal {att[i] + rest[i]:.0f} ms", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("ms")
    ax.set_ylim(0, 1.25 * max(a + b for a, b in zip(att, rest)))
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"warm times: median of {t['repeats']} alternated runs each\n({report['device']}, ISA via "
                 f"{report['kernel_path']}; PSNR {report['psnr']:.1f} dB, SSIM {report['ssim']:.3f})", fontsize=10)


def _plan_panel(ax, s: Dict[str, Any]) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    p = s["plan"]
    cells = np.asarray(p["cells"])
    nb = cells.shape[0]
    nt = p["blocks"]["target"]
    ax.imshow(cells, cmap=ListedColormap(PLAN_COLOURS), vmin=0, vmax=2, interpolation="nearest")
    for z in (nt - 0.5,):
        ax.axhline(z, color="k", lw=1)
        ax.axvline(z, color="k", lw=1)
    ticks = [(nt - 1) / 2, nt + (nb - nt - 1) / 2]
    ax.set_xticks(ticks, ["target keys", "context keys"])
    ax.set_yticks(ticks, ["target\nqueries", "context\nqueries"])
    ax.tick_params(length=0)
    for i, full in enumerate(p["full_rows"]):  # mark the query blocks computed exactly over KV'
        if full:
            ax.plot(nb - 0.5 + 0.6, i, marker="<", color="k", ms=3, clip_on=False)
    h = p["head"]
    kept = p["per_head"]["kept_context_blocks"][h]
    full = sum(p["full_rows"])
    ax.legend(handles=[Patch(color=PLAN_COLOURS[2], label="exact block"),
                      Patch(color=PLAN_COLOURS[1], label="pseudo-keys (block mean)"),
                      Patch(facecolor=PLAN_COLOURS[0], edgecolor="0.6", label="context block dropped")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=3)
    ax.set_title(f"plan of the default ratios: {s['spec']['tokens_per_call']:,} tokens, {nb} blocks of {p['block_size']}\n"
                 f"{s['layer']}, head {h}: {kept}/{p['blocks']['context']} context blocks kept, {full} query blocks "
                 f"exact (◀),\nother rows exact on {min(c for c in p['exact_counts'])} block(s); cost {p['relative_cost']:.2f} "
                 f"of dense", fontsize=9)


def _settings_panel(ax, s: Dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [ax.axhline(s["budget"], color="gray", ls="--", lw=1, label=f"budget {s['budget']}"),
               ax.scatter([1.0], [0.0], color="k", marker="*", s=60, label="dense attention")]
    top = 0.0
    for name, r in s["settings"].items():
        c = SETTING_COLOURS.get(name, "C4")
        x, lo, hi = r["relative_cost"], min(r["error_target"], r["error_context"]), max(r["error_target"], r["error_context"])
        top = max(top, hi)
        ax.plot([x, x], [lo, hi], color=c, lw=1, alpha=0.5)
        ax.scatter([x], [r["error_target"]], color=c, marker="o", s=36)
        ax.scatter([x], [r["error_context"]], color=c, marker="s", s=36)
        ax.annotate(f"{r['gflop_per_call']:.2f} GFLOP", (x, hi), textcoords="offset points", xytext=(6, 2), fontsize=7, color=c)
        handles.append(Line2D([], [], color=c, marker="o", ls="", label=SETTING_SHORT.get(name, r["label"])))
    handles += [Line2D([], [], color="0.4", marker="o", ls="", label="target queries"),
                Line2D([], [], color="0.4", marker="s", ls="", label="context queries")]
    ax.set_xlim(0, 1.08)
    ax.set_ylim(0, max(1.1 * top, 2 * s["budget"]))
    ax.set_xlabel(f"FLOPs per call relative to dense attention ({s['settings']['default']['dense_gflop_per_call']:.1f} GFLOP)")
    ax.set_ylabel("error of the worst layer (rel. L1)")
    ax.legend(handles=handles, fontsize=7, loc="center right")
    ax.set_title(f"held-out error vs FLOPs: calibrated for budget {s['budget']} on {len(s['calibration_samples'])} samples,\n"
                 f"evaluated on {len(s['held_out_samples'])} other ({s['spec']['layers']} layers x {s['spec']['heads']} heads)",
                 fontsize=9)


def _gpu_panel(ax, g: Dict[str, Any]) -> None:
    shown = g[g["shown"]]
    ax.axis("off")
    dense_name = "cuDNN ms" if "cuDNN" in shown.get("baseline", "") else "SDPA ms"
    rows = [[str(r["heads"]), f"{r['tokens']:,}", f"{r['dense_ms']:.2f}", f"{r['isa_ms']:.2f}", f"{r['speedup']:.2f}x"]
            for r in shown["rows"]]
    table = ax.table(cellText=rows, colLabels=["heads", "tokens", dense_name, "ISA ms", "speed-up"], loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.6)
    v = shown.get("versions", {})
    how = "measured on this machine" if g["shown"] == "measured" else f"recorded ({shown['source']})"
    rec = g["recorded"]
    same = [r for r in rec["rows"] if g["shown"] == "measured" and (r["heads"], r["tokens"]) ==
            (shown["rows"][0]["heads"], shown["rows"][0]["tokens"])]
    if same:
        ax.text(0.5, 0.12, f"recorded on {rec['card']}, {rec['date']} ({rec['source']}) at this size: "
                f"{same[0]['speedup']:.2f}x", ha="center", fontsize=8, transform=ax.transAxes)
    ax.set_title(f"GPU speed of one ISA attention call, {how}:\n{shown['card']}, {shown['date']}\n"
                 f"torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, bf16, head_dim {shown['head_dim']}, "
                 f"default ratios", fontsize=9)


def build_figure(report: Dict[str, Any]):
    """The demo's figure for ``report`` (what :func:`isa_plugin.demo.run_demo` returns): a matplotlib ``Figure``
    of six panels in two rows (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 11), gridspec_kw={"hspace": 0.55, "wspace": 0.3})
    _layers_panels(axes[0, :2], report)
    _times_panel(axes[0, 2], report)
    s = report["structured_call"]
    _plan_panel(axes[1, 0], s)
    _settings_panel(axes[1, 1], s)
    _gpu_panel(axes[1, 2], report["gpu_speed"])
    fig.text(0.5, 0.965, f"the demo edit: {report['model']}, {report['tokens_per_call']} tokens per attention call",
             ha="center", fontsize=12, weight="bold")
    fig.text(0.5, 0.49, f"one ICL attention call at a realistic grid (structured synthetic workload, "
             f"{s['spec']['tokens_per_call']:,} tokens)", ha="center", fontsize=12, weight="bold")
    if report["kernel_path"] == "reference":
        fig.text(0.5, 0.01, "On a CPU ISA runs its exact PyTorch reference (no Triton kernels), which is slower than dense "
                 "attention: the times above are no measure of ISA's speed. The speed-up needs the GPU kernels (bottom right).",
                 ha="center", va="bottom", fontsize=10, color="darkred")
    return fig


def plot_report(report: Dict[str, Any], path: Path) -> None:
    """Write :func:`build_figure` of ``report`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = build_figure(report)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
