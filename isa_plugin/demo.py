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


def _side_by_side(video: torch.Tensor, dense: torch.Tensor, isa: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, 3W + 2 gaps] from the input ([F, 3, H, W]) and two results ([F, H, W, 3])."""
    cols = [video.float().cpu(), dense.permute(0, 3, 1, 2), isa.permute(0, 3, 1, 2)]
    f = min(c.shape[0] for c in cols)
    gap = torch.ones(f, 3, cols[0].shape[2], 4)
    parts = []
    for c in cols:
        parts += [c[:f], gap]
    frame = torch.cat(parts[:-1], dim=3)
    # video codecs want sides divisible by 16: pad with white
    ph, pw = -frame.shape[2] % 16, -frame.shape[3] % 16
    return torch.nn.functional.pad(frame, (0, pw, 0, ph), value=1.0)


def _plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = list(layers)
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    axes[2].set_title(f"time ({report['device']})  PSNR {report['psnr']:.1f} dB, SSIM {report['ssim']:.3f}")
    fig.tight_layout()
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
        model: a ``WanInContextEditPipeline`` checkpoint (local folder or cached hub id) instead of the
            random pipeline.
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
        from .pipelines import WanInContextEditPipeline

        if not Path(model).exists() and model.count("/") != 1:
            raise FileNotFoundError(f"model {model!r}: no such folder (and not a hub id such as 'org/model')")
        pipe = WanInContextEditPipeline.from_pretrained(model, torch_dtype=dtype).to(dev)
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
            "alpha_s": s.alpha_s, "alpha_f": s.alpha_f, "alpha_ns": s.alpha_ns, "sharpness": s.sharpness,
            "mean_alpha_s": 1.0 if s.dense else _mean(s.alpha_s),
            "mean_alpha_f": 1.0 if s.dense else _mean(s.alpha_f),
            "mean_alpha_ns": 1.0 if s.dense else _mean(s.alpha_ns),
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
    frames = _side_by_side(src, cmp["dense"].frames, cmp["isa"].frames)
    try:
        video_path = write_video(out / "side_by_side.mp4", frames, fps=8)
    except Exception as e:  # no ffmpeg backend for imageio on this machine: a GIF needs only Pillow
        logger.warning("cannot write mp4 (%s: %s); writing a GIF instead", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        video_path = write_video(out / "side_by_side.gif", frames, fps=8)
    _plot(report, out / "plot.png")
    report["files"] = {"profile": str(profile_path), "video": str(video_path), "plot": str(out / "plot.png"),
                       "report": str(out / "report.json")}
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
