"""``isa edit``: edit a video or an image with a saved pipeline, with ISA (a profile or the default ratios) or densely.

The pipeline's family is detected from the saved pipeline as ``isa calibrate`` does, and it is called the way
its calibration runner calls it (:meth:`isa_plugin.calibration.runners.CalibrationRunner.generate`), so every
pipeline ``isa calibrate`` takes can be used: video pipelines write a video (mp4, webm or gif), image
pipelines (Flux Kontext, QwenImage) an image (png or jpg). ``--input`` / ``--output`` are accepted for
``--video`` / ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from .cli import CLIError, command

logger = logging.getLogger(__name__)

# the suffixes --out takes: a video pipeline writes a video, an image pipeline an image
_VIDEO_OUT = (".mp4", ".webm", ".mov", ".gif")
_IMAGE_OUT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _size(text: str):
    """``HxW`` (pixels) -> (height, width); an argparse ``type``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels; write e.g. 480x832")
    return int(m.group(1)), int(m.group(2))


_size.__name__ = "size"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, metavar="PATH_OR_ID",
                   help="pipeline folder (save_pretrained) or cached hub id; its family is detected")
    p.add_argument("--video", "--input", dest="video", required=True, metavar="IN",
                   help="what to edit: a video (mp4/webm/gif), a folder of frames, or an image; image pipelines take "
                        "the first frame")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--out", "--output", dest="out", required=True, metavar="OUT",
                   help=f"file to write: {'/'.join(s[1:] for s in _VIDEO_OUT)} for video pipelines (a gif beside it "
                        f"when mp4 cannot be written), {'/'.join(s[1:] for s in _IMAGE_OUT)} for image pipelines")
    isa = p.add_mutually_exclusive_group()
    isa.add_argument("--profile", metavar="YAML", help="ISA with this threshold profile (from isa calibrate on this model)")
    isa.add_argument("--config", choices=["defaults"],
                     help="ISA with the default ratios, ISAConfig() (the default when neither --profile nor --dense is "
                          "given); a pipeline that runs ISA by default (LIVEditor) uses its own settings")
    isa.add_argument("--dense", action="store_true", help="no ISA: the model's own dense attention")
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the pipeline's own)")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance scale, passed as guidance_scale (default: the pipeline's own)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the initial noise (default 0)")
    p.add_argument("--frames", type=int, metavar="F",
                   help="video pipelines: use the first F frames of the input, 1 + k x the model's temporal factor "
                        "(default: all, trimmed to such a count); image-to-video pipelines: frames to make (default: "
                        "the pipeline's own)")
    p.add_argument("--size", type=_size, metavar="HxW",
                   help="output height x width in pixels, multiples of the model's spatial factor (default: the "
                        "input's, rounded down to them)")
    p.add_argument("--fps", type=int, default=16, metavar="N", help="frame rate of the written video (default 16)")
    p.add_argument("--device", help="cuda (or cuda:N) or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar")


@command("edit", help="edit a video or an image with a pipeline, with ISA (a profile or the default ratios) or densely",
         arguments=_arguments)
def edit(args) -> int:
    """Edit the input with the pipeline and write the result; print the ISA counters and the time taken.

    ISA comes from --profile (a threshold profile calibrated on this model), --config defaults (the default
    ratios, ISAConfig(); also what runs when neither is given; a pipeline that runs ISA by default, such as
    LIVEditor's, runs its own settings, the ratios on the blocking the model was trained with) or is off with
    --dense (such a pipeline is called with attention="dense").
    """
    t_start = time.perf_counter()
    for flag, value in (("--steps", args.steps), ("--frames", args.frames), ("--fps", args.fps)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} {value}: give a positive number")
    out = _check_out(args.out)
    source = _read_input(args.video)
    setting, what = _isa_setting(args)

    import torch

    from .adapters.defaults import attention_kwargs_for, runs_isa_by_default
    from .calibration.runners import registered_runners, runner_for
    from .pipeline_loading import load_pipeline

    pipe = load_pipeline(args.pipeline, None, args.device, args.dtype)
    name = type(pipe).__name__
    try:
        runner = runner_for(pipe)
    except TypeError:
        known = sorted({c for r in registered_runners().values() for c in r.pipeline_classes})
        raise CLIError(f"--pipeline {args.pipeline}: isa edit cannot run a {name}; it runs {', '.join(known)}") from None
    makes_video = _call_takes(pipe, "num_frames")
    if makes_video != (out.suffix.lower() in _VIDEO_OUT):
        kind, suffixes = ("a video", _VIDEO_OUT) if makes_video else ("an image", _IMAGE_OUT)
        raise CLIError(f"--out {args.out}: {name} makes {kind}; give a file name ending {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    sample, height, width, frames = _prepare(runner, pipe, source, args, makes_video)
    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if setting is None:
        extra.update(attention_kwargs_for(pipe, "dense"))
    elif args.profile is None and runs_isa_by_default(pipe):
        # a model trained with ISA in the loop: its pipeline's own settings (LIVEditor: the authors' blocking)
        extra.update(attention_kwargs_for(pipe, "isa"))
        what = f"default ratios ({name}'s own ISA settings, those the model was trained with)"
    else:
        from .adapters import apply_isa

        try:
            apply_isa(pipe, setting)
        except ValueError as e:
            raise CLIError(f"--profile {args.profile}: {e}" if args.profile else str(e)) from None
    steps = args.steps or _call_default(pipe, "num_inference_steps", 50)
    pipe.set_progress_bar_config(disable=args.no_progress, desc=f"editing ({'dense' if setting is None else 'ISA'})")
    t_load = time.perf_counter() - t_start
    t0 = time.perf_counter()
    result = runner.generate(pipe, sample, args.prompt, height=height, width=width, num_frames=frames, steps=steps,
                             generator=torch.Generator(device="cpu").manual_seed(args.seed), **extra)
    seconds = time.perf_counter() - t0
    written = _write(out, result, args.fps)
    _print_counters(pipe, what, setting is not None)
    print(f"edited in {seconds:.1f} s ({steps} steps, {seconds / steps:.2f} s per step); loading took {t_load:.1f} s")
    shape = f"{result.shape[0]} frames, {result.shape[-2]}x{result.shape[-1]}, {args.fps} fps" if makes_video else \
        f"{result.shape[-2]}x{result.shape[-1]}"
    print(f"wrote {written} ({shape})")
    return 0


# ------------------------------------------------------------------------------------ steps of the edit
def _check_out(text: str) -> Path:
    out = Path(text)
    if out.is_dir():
        raise CLIError(f"--out {text} is a folder; give a file name such as edited.mp4 (or edited.png for an image pipeline)")
    if out.suffix.lower() not in _VIDEO_OUT + _IMAGE_OUT:
        raise CLIError(f"--out {text}: unknown file type {out.suffix or '(none)'}; use {', '.join(_VIDEO_OUT + _IMAGE_OUT)}")
    if not out.parent.is_dir():
        raise CLIError(f"--out {text}: folder {out.parent} does not exist; create it first")
    return out


def _read_input(path: str):
    """The input as frames [F, 3, H, W] in [0, 1] (an image is one frame)."""
    from .calibration.video import read_video

    if not Path(path).exists():
        raise CLIError(f"--video {path}: no such file or folder")
    try:
        return read_video(path)
    except ValueError as e:
        raise CLIError(f"--video {path}: {e}") from None


def _isa_setting(args):
    """(what apply_isa takes or None for --dense, how the run is described)."""
    if args.dense:
        return None, "off (--dense: the model's own attention)"
    if args.profile is None:
        from .config import ISAConfig

        return ISAConfig(), "default ratios (ISAConfig(); calibrate a profile with `isa calibrate` for per-layer ratios)"
    from .pipeline_loading import load_transformer_skeleton
    from .profile import ThresholdProfile

    profile = ThresholdProfile.load(args.profile)
    if Path(args.pipeline).is_dir():  # before the weights are read: a profile for another model fails fast
        skeleton = load_transformer_skeleton(args.pipeline)
        if skeleton is not None:
            try:
                profile.for_component("transformer").check_compatible(skeleton)
            except ValueError as e:
                raise CLIError(f"--profile {args.profile}: {e}") from None
    return profile, f"profile {args.profile}"


def _prepare(runner, pipe, source, args, makes_video):
    """(sample, height, width, frames to make), checking --size and --frames against what the model takes."""
    name = type(pipe).__name__
    mult = max(1, int(runner.spatial_multiple(pipe)))
    if args.size is not None:
        h, w = args.size
        if h % mult or w % mult:
            lo = f"{max(mult, h // mult * mult)}x{max(mult, w // mult * mult)}"
            hi = f"{-(-h // mult) * mult}x{-(-w // mult) * mult}"
            raise CLIError(f"--size {h}x{w}: {name} takes sides that are multiples of {mult}; use e.g. --size {lo} or {hi}")
    height, width = args.size or (None, None)
    if runner.media == "video":
        if args.frames is not None:
            t = max(1, int(runner.temporal_factor(pipe)))
            if (args.frames - 1) % t:
                lo, hi = 1 + (args.frames - 1) // t * t, 1 + (-(-(args.frames - 1) // t)) * t
                raise CLIError(f"--frames {args.frames}: {name} takes 1 + {t}k frames; use e.g. --frames {lo} or {hi}")
            if args.frames > source.shape[0]:
                raise CLIError(f"--frames {args.frames}: {args.video} has {source.shape[0]} frames")
        sample, h, w, nf = runner.prepare(pipe, source, height=height, width=width, num_frames=args.frames)
        return sample, h, w, nf
    if not makes_video and args.frames is not None:
        raise CLIError(f"--frames {args.frames}: {name} edits one image; leave --frames out")
    if source.shape[0] > 1:
        logger.info("%s takes an image: editing the first frame of %s", name, args.video)
    sample, h, w, _ = runner.prepare(pipe, source, height=height, width=width)
    frames = (args.frames or _call_default(pipe, "num_frames", 1)) if makes_video else 1
    return sample, h, w, frames


def _write(out: Path, result, fps: int) -> Path:
    """Write [F, 3, H, W] in [0, 1]: an image file, or a video (a gif beside it when the video cannot be written)."""
    from .calibration.video import write_video

    if out.suffix.lower() in _IMAGE_OUT:
        import imageio.v3 as iio

        iio.imwrite(out, (result[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        return out
    try:
        return write_video(out, result, fps=fps)
    except Exception as e:  # no ffmpeg backend for imageio on this machine: a gif needs only Pillow
        gif = out.with_suffix(".gif")
        logger.warning("cannot write %s (%s: %s); writing %s instead", out, type(e).__name__,
                       str(e).splitlines()[0] if str(e) else "", gif)
        return write_video(gif, result, fps=fps)


def _print_counters(pipe, what: str, applied: bool) -> None:
    """The ISA counters of the run (:func:`isa_plugin.stats`), summed over layers."""
    from collections import Counter

    from .adapters import stats

    print(f"ISA: {what}")
    if not applied:
        return
    per_layer = stats(pipe)
    calls = sum(s["isa_calls"] for s in per_layer.values())
    fallbacks = sum(s["fallbacks"] for s in per_layer.values())
    backends, reasons = Counter(), Counter()
    for s in per_layer.values():
        backends.update(s.get("backends", {}))
        reasons.update(s.get("reasons", {}))
    executors = ", ".join(f"{k} {v}" for k, v in backends.most_common())
    why = "; ".join(f"{k}: {v}" for k, v in reasons.most_common())
    print(f"  {len(per_layer)} layers: {calls} ISA calls" + (f" (executors: {executors})" if executors else ""))
    print(f"  {fallbacks} dense fallbacks" + (f" ({why})" if why else ""))


# ------------------------------------------------------------------------------------ the pipeline's own defaults
def _call_signatures(pipe):
    import inspect

    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None:
            try:
                yield inspect.signature(call).parameters
            except (TypeError, ValueError):  # pragma: no cover - a builtin __call__
                continue


def _call_takes(pipe, name: str) -> bool:
    """Whether the pipeline's call (or a base class's, when it forwards ``**kwargs``) has parameter ``name``."""
    return any(name in params for params in _call_signatures(pipe))


def _call_default(pipe, name: str, fallback):
    """The default of the pipeline call's parameter ``name`` (the nearest class that gives one), else ``fallback``."""
    import inspect

    for params in _call_signatures(pipe):
        p = params.get(name)
        if p is not None and p.default is not inspect.Parameter.empty and p.default is not None:
            return p.default
    return fallback
