"""The end-to-end demo: calibrate, save and load a profile, edit with dense attention and with ISA, compare.

:func:`run_demo` is what ``isa demo`` runs. By default it builds a small randomly initialised
``WanInContextEditPipeline`` (no downloads) and edits the bundled sample video; ``model=`` runs the same
flow on a real checkpoint saved with ``save_pretrained`` (a local folder) or a cached hub id.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def _device_dtype(device: Optional[str]):
    from .devices import resolve_device

    dev = resolve_device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


#: the difference panel of the demo video shows |dense - ISA| times this (clipped at white)
DIFF_GAIN = 10


def _side_by_side(video: torch.Tensor, dense: torch.Tensor, isa: torch.Tensor, *, min_height: int = 240, note: str = ""):
    """A readable comparison video: labelled panels input | dense | ISA | amplified difference, PSNR per frame.

    Args:
        video: the input [F, 3, H, W] in [0, 1]; dense, isa: the two results [F, H, W, 3] in [0, 1].
        min_height: panels are scaled up by a whole factor (nearest neighbour) to at least this height.
        note: text added to every frame's caption.

    Returns:
        ``(frames [F', 3, H', W'] in [0, 1], PSNR of ISA vs dense per frame in dB)``; sides are multiples of 16.
    """
    import math

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from .metrics import psnr

    cols = [video.float().cpu().permute(0, 2, 3, 1), dense.float().cpu(), isa.float().cpu()]
    f = min(c.shape[0] for c in cols)
    cols = [c[:f].clamp(0, 1) for c in cols]
    cols.append((DIFF_GAIN * (cols[1] - cols[2]).abs()).clamp(0, 1))
    per_frame = [psnr(cols[1][i : i + 1], cols[2][i : i + 1]) for i in range(f)]
    h, w = cols[0].shape[1:3]
    k = max(1, math.ceil(min_height / h))
    font = ImageFont.load_default(size=max(12, 6 * k))
    titles = ["input", "dense attention", "ISA", f"|dense - ISA| x{DIFF_GAIN}"]
    gap, bar = 6, max(12, 6 * k) + 10
    width = 4 * w * k + 3 * gap
    height = h * k + 2 * bar
    width, height = width + (-width % 16), height + (-height % 16)
    out = []
    for i in range(f):
        canvas = Image.new("RGB", (width, height), (20, 20, 20))
        draw = ImageDraw.Draw(canvas)
        for j, (c, title) in enumerate(zip(cols, titles)):
            x0 = j * (w * k + gap)
            panel = (c[i].numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(panel).resize((w * k, h * k), Image.NEAREST), (x0, bar))
            draw.text((x0 + 4, 4), title, fill=(255, 255, 255), font=font)
        p = per_frame[i]
        psnr_text = "identical" if not math.isfinite(p) or p >= 100 else f"{p:.1f} dB"
        draw.text((4, bar + h * k + 4), f"frame {i + 1}/{f}    PSNR of ISA vs dense: {psnr_text}    {note}", fill=(255, 255, 255), font=font)
        out.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out), per_frame


#: the card whose kernel cost model the demo's plot shows next to the measured time
PREDICTION_CARD = "NVIDIA H200"
#: a Wan 480p 81-frame edit: target and context tokens per attention call, and the 14B model's heads x head_dim
WAN_480P_TOKENS = {"target": 32760, "context": 32760}
WAN_14B_HEADS = (40, 128)


def _gpu_prediction(profile, tokens: Dict[str, int], *, heads: int, head_dim: int, calls_per_layer: float) -> Optional[Dict[str, Any]]:
    """What the kernels' cost model predicts for this profile on :data:`PREDICTION_CARD` (a prediction, not a run).

    Returns:
        ``{"card", "source", "dense_ms", "isa_ms"}`` (self-attention time of the whole edit at this size),
        ``"speedup"`` and ``"speedup_wan_480p"`` (the same ratios at 65,520 tokens per call with the Wan 14B
        shape, 40 heads x 128), or None when the package has no cost model for that card.
    """
    from .calibration.cost import load_cost_model, predict_call_ms

    try:
        cm = load_cost_model(device_name=PREDICTION_CARD)
    except ValueError:
        return None
    if cm.head_dim_ref is None:  # the pair-count fallback: no kernel measurements to predict from
        return None
    tokens = {k: int(v) for k, v in tokens.items() if v}

    def edit_ms(tok, ratios_of, shape=(heads, head_dim)):
        return sum(predict_call_ms(cm, ratios_of(n), tok, block_size=profile.block_size, heads=shape[0], head_dim=shape[1])
                   for n in profile.layer_names)

    def isa_ratios(name):
        s = profile.layers[name][0]
        return None if s.dense else {"alpha_s": s.alpha_s, "alpha_f": s.alpha_f, "alpha_ns": s.alpha_ns}

    def mean_ratios(name):  # per-head values do not carry over to another head count
        r = isa_ratios(name)
        return r and {k: _mean(v) for k, v in r.items()}

    dense_ms = edit_ms(tokens, lambda n: None) * calls_per_layer
    isa_ms = edit_ms(tokens, isa_ratios) * calls_per_layer
    return {"card": PREDICTION_CARD, "source": cm.source, "dense_ms": dense_ms, "isa_ms": isa_ms,
            "speedup": dense_ms / isa_ms if isa_ms > 0 else None,
            "tokens": tokens, "floor_ms": cm.floor,
            "speedup_wan_480p": edit_ms(WAN_480P_TOKENS, lambda n: None, WAN_14B_HEADS) / edit_ms(WAN_480P_TOKENS, mean_ratios, WAN_14B_HEADS)}


def _plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = list(layers)
    x = range(len(names))
    pred = report.get("gpu_prediction")
    fig, axes = plt.subplots(1, 4 if pred else 3, figsize=(20 if pred else 15, 5.2))
    for key, label in (("alpha_s", "α_s (context kept)"), ("alpha_f", "α_f (exact queries)"), ("alpha_ns", "α_ns (exact keys)")):
        axes[0].plot(x, [layers[n]["mean_" + key] for n in names], marker="o", label=label)
    axes[0].set_title("ratios per layer (1 = dense)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    for key, label in (("error_target", "target queries"), ("error_context", "context queries")):
        axes[1].plot(x, [layers[n].get("measured_" + key) or 0.0 for n in names], marker="o", label=label)
    axes[1].axhline(report["budget"], color="gray", ls="--", label="budget")
    axes[1].set_title("attention-output error in the ISA run (rel. L1)")
    axes[1].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, fontsize=7, ha="right")
        ax.set_xlabel("layer")
    d, i = report["dense"], report["isa"]
    axes[2].bar(["attention\ndense", "attention\nISA", "total\ndense", "total\nISA"],
                [d["attention_ms"], i["attention_ms"], d["total_ms"], i["total_ms"]], color=["C0", "C1", "C0", "C1"])
    axes[2].set_ylabel("ms")
    axes[2].set_title(f"measured time ({report['device']}, {report['kernel_path']})\nPSNR {report['psnr']:.1f} dB, SSIM {report['ssim']:.3f}")
    if pred:
        ax = axes[3]
        bars = ax.bar(["attention\ndense", "attention\nISA"], [pred["dense_ms"], pred["isa_ms"]], color=["C0", "C1"],
                      hatch="//", edgecolor="white", alpha=0.8)
        ax.bar_label(bars, fmt="%.3g ms", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (predicted, log scale)")
        ax.set_title(f"PREDICTION for {pred['card']} (kernel cost model,\nnot measured): this profile at this size")
        n_tok = sum(pred["tokens"].values())
        ax.set_xlabel(f"predicted speed-up at {n_tok:,} tokens per call: {pred['speedup']:.2g}x"
                + (f"\n(short calls are bound by launch overhead: >= {pred['floor_ms']:.3g} ms per ISA call)" if n_tok < 16384 else "")
                + f"\nsame ratios (head means) at 65,520 tokens, 40 heads x 128: {pred['speedup_wan_480p']:.2f}x", fontsize=8)
    if report["kernel_path"] == "reference":
        fig.text(0.5, 0.01, "Measured on a CPU: ISA runs its exact PyTorch reference there (no Triton kernels), which is "
                 "slower than dense attention. The speed-up needs the GPU kernels" +
                 ("; the right panel is the kernels' cost-model prediction, not a measurement." if pred else "."),
                 ha="center", va="bottom", fontsize=9, color="darkred")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(v) -> float:
    return float(sum(v) / len(v)) if isinstance(v, tuple) else float(v)


def run_demo(out_dir: Union[str, Path] = "isa_demo", *, size: str = "tiny", model: Optional[str] = None,
             device: Optional[str] = None, budget: float = 0.05, steps: Optional[int] = None, seed: int = 0,
             prompt: str = "turn the scene into a snowy winter evening", video: Optional[str] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Calibrate, save/load a profile, run dense and ISA edits, and write a report, a video and a plot.

    Args:
        out_dir: folder for ``profile.yaml``, ``side_by_side.mp4``, ``plot.png`` and ``report.json``.
        size: preset of the random pipeline (``tiny`` for CPUs; ``small``/``large`` for GPUs), see
            :data:`isa_plugin.pipelines.tiny.PRESETS`. With ``model`` it sets only the edit size.
        model: a ``WanInContextEditPipeline`` or ``LIVEditorPipeline`` folder (e.g. from ``isa
            convert-liveditor``), or a cached hub id of the former, instead of the random pipeline.
        device: ``"cuda"`` or ``"cpu"`` (default: CUDA when available).
        budget: relative L1 error budget of the attention outputs used in calibration.
        steps: denoising steps (default: the preset's).
        video: a video file or frame folder to edit (default: the bundled sample).

    Returns:
        the report (also written to ``out_dir/report.json``).

    Raises:
        ValueError: an unknown size, or a device this machine does not have (``"gpu"``, ``"cuda"``
            without a GPU); FileNotFoundError: a missing video or model folder.
    """
    from .profile import ThresholdProfile
    from .profile_io import sidecar_path
    from .calibration.recorder import calibrate
    from .calibration.video import read_video, sample_video_path, write_video
    from .evaluate import compare_edit
    from .pipelines.tiny import PRESETS, build_tiny_wan_icl_pipeline

    if size not in PRESETS:
        raise ValueError(f"size={size!r} is not a preset; choose one of {sorted(PRESETS)}")
    preset = PRESETS[size]
    steps = steps or preset.steps
    dev, dtype = _device_dtype(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if model:
        from .pipelines import LIVEditorPipeline, WanInContextEditPipeline

        if not Path(model).exists() and model.count("/") != 1:
            raise FileNotFoundError(f"model {model!r}: no such folder (and not a hub id such as 'org/model')")
        index = Path(model) / "model_index.json"
        is_liveditor = index.is_file() and json.loads(index.read_text()).get("_class_name") == LIVEditorPipeline.__name__
        pipe_cls = LIVEditorPipeline if is_liveditor else WanInContextEditPipeline
        pipe = pipe_cls.from_pretrained(model, torch_dtype=dtype).to(dev)
    else:
        pipe = build_tiny_wan_icl_pipeline(preset, seed=seed, device=dev, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    h, w, f = preset.height, preset.width, preset.frames
    src = read_video(video or sample_video_path(), height=h, width=w)
    if src.shape[0] < f:  # loop a short clip to the preset's length
        src = src.repeat((f + src.shape[0] - 1) // src.shape[0], 1, 1, 1)
    src = src[:f]

    logger.info("calibrating on %s (%d frames, %dx%d, %d steps)", "sample video", f, h, w, steps)
    t0 = time.perf_counter()
    profile, _ = calibrate(pipe, [src], prompt, budget=budget, steps=steps, calib_steps=min(4, steps),
                           height=h, width=w, frames=f, block_size=preset.block_size, progress=progress, seed=seed)
    calib_s = time.perf_counter() - t0
    profile_path = profile.save(out / "profile.yaml")
    profile = ThresholdProfile.load(profile_path)

    cmp = compare_edit(pipe, profile, src, prompt, height=h, width=w, frames=f, steps=steps, seed=seed)
    served = {}
    for s in cmp["isa"].stats.values():
        for b, n in s.get("backends", {}).items():
            served[b] = served.get(b, 0) + n

    layers = {}
    for name, settings in profile.layers.items():
        s = settings[0]
        layers[name] = {
            "dense": s.dense,
            "mode": s.mode, "settings": None if s.dense else s.config.selection.to_dict(s.config.settings),
            "mean_alpha_s": 1.0 if s.dense else _mean(getattr(s, "alpha_s", 1.0)),
            "mean_alpha_f": 1.0 if s.dense else _mean(getattr(s, "alpha_f", 1.0)),
            "mean_alpha_ns": 1.0 if s.dense else _mean(getattr(s, "alpha_ns", 1.0)),
            "calibrated_error_target": s.error_target, "calibrated_error_context": s.error_context,
            "predicted_relative_cost": s.relative_cost,
            "measured_error_target": cmp["layer_errors"].get(name, {}).get("target"),
            "measured_error_context": cmp["layer_errors"].get(name, {}).get("context"),
            "isa_calls": cmp["isa"].stats.get(name, {}).get("isa_calls", 0),
            "fallbacks": cmp["isa"].stats.get(name, {}).get("reasons", {}),
        }
    run = lambda r: {"total_ms": r.total_ms, "attention_ms": r.attention_ms, "attention_calls": r.attention_calls}
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "kernel_path": max(served, key=served.get) if served else "none",
        "isa_calls_by_backend": served,
        "model": model or f"random WanInContextEditPipeline ({size})",
        "preset": preset.to_dict(),
        "tokens_per_call": 2 * preset.tokens_per_video(),
        "steps": steps,
        "budget": budget,
        "calibration_s": calib_s,
        "psnr": cmp["psnr"],
        "ssim": cmp["ssim"],
        "dense": run(cmp["dense"]),
        "isa": run(cmp["isa"]),
        "attention_speedup": cmp["dense"].attention_ms / max(cmp["isa"].attention_ms, 1e-9),
        "total_speedup": cmp["dense"].total_ms / max(cmp["isa"].total_ms, 1e-9),
        "isa_calls": cmp["isa_calls"],
        "fallback_calls": cmp["fallback_calls"],
        "fallbacks": cmp["fallbacks"],
        "profile_summary": profile.summary(),
        "layers": layers,
        "versions": profile.calibrated_on.get("versions", {}),
    }
    cfg = pipe.transformer.config
    report["gpu_prediction"] = _gpu_prediction(
        profile, profile.calibrated_on.get("tokens") or {"target": preset.tokens_per_video(), "context": preset.tokens_per_video()},
        heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
        calls_per_layer=cmp["isa"].attention_calls / max(len(profile.layer_names), 1))
    frames, report["psnr_per_frame"] = _side_by_side(
        src, cmp["dense"].frames, cmp["isa"].frames,
        note="" if model else "(random weights: the edits are noise; compare dense with ISA)")
    try:
        video_path = write_video(out / "side_by_side.mp4", frames, fps=8)
    except Exception as e:  # no ffmpeg backend for imageio on this machine: a GIF needs only Pillow
        logger.warning("cannot write mp4 (%s: %s); writing a GIF instead", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        video_path = write_video(out / "side_by_side.gif", frames, fps=8)
    _plot(report, out / "plot.png")
    report["files"] = {"profile": str(profile_path), "video": str(video_path), "plot": str(out / "plot.png"),
                       "report": str(out / "report.json")}
    sidecar = sidecar_path(profile_path)
    if sidecar.exists():  # per-head values live in the profile's sidecar
        report["files"]["profile_sidecar"] = str(sidecar)
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
