"""Run a diffusers ICL pipeline densely on sample videos and collect calibration statistics.

The pipeline runs unmodified (dense attention: the adapters' processors in dense mode, installed by
:func:`isa_plugin.adapters.observe_attention`). At a few denoising steps spread over the schedule, every
self-attention call of the transformer (both CFG branches) is measured by
:meth:`CalibrationStats.observe`; after the last sampled step the run stops (no further steps, no VAE
decode). :func:`calibrate` then fits a :class:`~isa_plugin.ThresholdProfile`.

Per pipeline class a *runner* turns (video, prompt, size, steps) into the pipeline call; see
:func:`register_runner` to add one.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..timesteps import bucket_edges, timestep_scalar
from .stats import CalibrationStats, Grid

__all__ = ["record", "calibrate", "register_runner", "StatsObserver", "sampled_steps"]

logger = logging.getLogger(__name__)

VideoArg = Union[str, Path, torch.Tensor]
Runner = Callable[..., Any]
_RUNNERS: Dict[str, Runner] = {}


class _Done(Exception):
    """Raised inside the transformer once every sampled step has been measured (ends the run early)."""


def register_runner(pipeline_class_name: str, runner: Runner) -> Runner:
    """Register how to call a pipeline class on one sample.

    ``runner(pipe, video, prompt, *, height, width, num_frames, num_inference_steps, generator, **extra)``
    must run the pipeline once (``video`` is [F, 3, H, W] in [0, 1]); its output is ignored.
    """
    _RUNNERS[pipeline_class_name] = runner
    return runner


def _wan_icl_runner(pipe, video, prompt, *, height, width, num_frames, num_inference_steps, generator, **extra):
    return pipe(prompt=prompt, video=video, height=height, width=width, num_frames=num_frames,
                num_inference_steps=num_inference_steps, generator=generator, output_type="latent", **extra)


register_runner("WanInContextEditPipeline", _wan_icl_runner)


def _runner_for(pipe) -> Runner:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _RUNNERS:
            return _RUNNERS[cls.__name__]
    return _wan_icl_runner  # the generic call: prompt + video + size + steps


def sampled_steps(num_steps: int, k: int) -> List[int]:
    """``k`` step indices spread evenly over ``num_steps`` (first and last included)."""
    if num_steps < 1:
        raise ValueError(f"steps={num_steps} must be at least 1")
    k = max(1, min(k, num_steps))
    if k == 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (k - 1)) for i in range(k)})


class StatsObserver:
    """An ``observe_attention`` observer that feeds :class:`CalibrationStats` at selected denoising steps.

    Steps are counted per run: a transformer call whose timestep differs from the previous call's starts a
    new step (CFG branches of one step share it). Call :meth:`new_run` before each pipeline call.

    Args:
        stats: where measurements go.
        steps: step indices to measure (None: every call).
        on_step: called with the step index whenever a measured step starts (progress bars).
    """

    def __init__(self, stats: CalibrationStats, steps: Optional[Sequence[int]] = None, on_step: Optional[Callable[[int], None]] = None):
        self.stats = stats
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.last = None if steps is None else max(self.steps)
        self.on_step = on_step
        self.tokens: Optional[Dict[str, int]] = None  # token counts of the first measured call's layout
        self.new_run()

    def new_run(self) -> None:
        self.step = -1
        self._t = object()
        self._call = None
        self.measured_calls = 0

    def __call__(self, layer_name, q, k, v, layout, step_info) -> None:
        call = getattr(step_info, "call_index", None)
        if call != self._call:
            self._call = call
            t = timestep_scalar(getattr(step_info, "timestep", None))
            if t != self._t:
                self._t = t
                self.step += 1
                if self.last is not None and self.step > self.last:
                    raise _Done()
                if self.on_step is not None and (self.steps is None or self.step in self.steps):
                    self.on_step(self.step)
            if self.steps is None or self.step in self.steps:
                self.measured_calls += 1
        if self.steps is None or self.step in self.steps:
            if self.tokens is None and hasattr(layout, "num"):
                self.tokens = {kind: layout.num(kind) for kind in ("target", "context", "text")}
            self.stats.observe(layer_name, q, k, v, layout, timestep=getattr(step_info, "timestep", None))


def _load_video(v: VideoArg, frames, height, width) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        video = v.float()
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"a video tensor must be [F, 3, H, W] in [0, 1]; got {tuple(video.shape)}")
        if frames is not None:
            video = video[:frames]
        if height is not None and width is not None and tuple(video.shape[-2:]) != (height, width):
            video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return video
    from .video import read_video

    return read_video(v, frames=frames, height=height, width=width)


def _fit_shape(pipe, video: torch.Tensor, frames: Optional[int]) -> Tuple[torch.Tensor, int, int, int]:
    """Trim frames to 1 + k·(temporal factor) and round the size down to the model's spatial multiple."""
    t_fac = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    s_fac = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    tr = getattr(pipe, "transformer", None)
    patch = getattr(getattr(tr, "config", None), "patch_size", None)
    p = int(patch[-1]) if isinstance(patch, (list, tuple)) else int(patch or 1)
    mult = s_fac * p
    f = video.shape[0]
    if frames is None and t_fac > 1:
        f = (f - 1) // t_fac * t_fac + 1
        video = video[:f]
    h, w = video.shape[-2:]
    h2, w2 = max(mult, h // mult * mult), max(mult, w // mult * mult)
    if (h2, w2) != (h, w):
        logger.info("resizing calibration video from %dx%d to %dx%d (multiples of %d)", h, w, h2, w2, mult)
        video = torch.nn.functional.interpolate(video, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False)
    return video, int(video.shape[0]), int(h2), int(w2)


def _timestep_edges(pipe, steps: int, recorded: List[int], buckets: int) -> Tuple[float, ...]:
    """Bucket edges (:func:`~isa_plugin.timesteps.bucket_edges`) of the scheduler's timesteps at the recorded steps."""
    if buckets <= 1:
        return ()
    try:
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(steps)
        ts = [float(t) for t in sched.timesteps]
    except Exception as e:  # pragma: no cover - exotic schedulers
        logger.warning("cannot list the scheduler's timesteps (%s); calibrating one timestep bucket", e)
        return ()
    return bucket_edges([ts[i] for i in recorded if i < len(ts)], buckets)


def record(pipe, videos: Sequence[VideoArg], prompts: Union[str, Sequence[str], None] = None, *, steps: int = 20,
           calib_steps: int = 4, height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None,
           grid: Optional[Grid] = None, block_size: int = 64, blocks_per_kind: int = 48, tokens_per_block: int = 16,
           timestep_buckets: int = 1, seed: int = 0, progress: bool = False, pipeline_kwargs: Optional[Dict[str, Any]] = None,
           ) -> Tuple[CalibrationStats, Dict[str, Any]]:
    """Run ``pipe`` densely on each video and measure ISA's error at ``calib_steps`` of ``steps`` steps.

    Args:
        pipe: a diffusers ICL pipeline served by an isa-plugin adapter (e.g. ``WanInContextEditPipeline``).
        videos: paths (mp4/gif/frame folder) or [F, 3, H, W] tensors in [0, 1].
        prompts: one prompt for all videos or one per video (default ``""``).
        steps: the denoising schedule length; ``calib_steps`` steps spread over it are measured (both CFG
            branches) and the run stops after the last one.
        height, width, frames: resize / trim the videos (default: their own size, rounded to what the model takes).
        grid, block_size, blocks_per_kind, tokens_per_block: see :class:`CalibrationStats`.
        timestep_buckets: measure this many timestep buckets separately (1 = one setting for all steps).
        pipeline_kwargs: extra keyword arguments for every pipeline call (e.g. ``guidance_scale``).

    Returns:
        ``(stats, metadata)``; metadata is what the profile records under ``calibrated_on``.

    Raises:
        ValueError: no videos, a prompt count that differs from the video count, or no attention call
            could be measured (the pipeline's layout is unknown to the adapters).
    """
    from ..adapters import observe_attention
    from ..profile import config_hash

    videos = list(videos)
    if not videos:
        raise ValueError("calibration needs at least one sample video")
    if prompts is None or isinstance(prompts, str):
        prompts = [prompts or ""] * len(videos)
    prompts = list(prompts)
    if len(prompts) == 1 and len(videos) > 1:
        prompts = prompts * len(videos)
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(prompts)} prompts for {len(videos)} videos; give one prompt, or one per video")
    recorded = sampled_steps(steps, calib_steps)
    edges = _timestep_edges(pipe, steps, recorded, timestep_buckets)
    stats = CalibrationStats(grid, block_size=block_size, timestep_edges=edges, blocks_per_kind=blocks_per_kind,
                             tokens_per_block=tokens_per_block, seed=seed)
    runner = _runner_for(pipe)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(videos) * len(recorded), desc="calibrating", unit="step")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    observer = StatsObserver(stats, recorded, on_step=(lambda s: bar.update(1)) if bar is not None else None)
    shape = None
    skipped = set()
    try:
        for i, (v, prompt) in enumerate(zip(videos, prompts)):
            video = _load_video(v, frames, height, width)
            video, nf, h, w = _fit_shape(pipe, video, frames)
            shape = shape or (h, w, nf)
            observer.new_run()
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            with observe_attention(pipe, observer) as procs:
                for name, p in procs.items():
                    if "/" in name:  # only the main transformer is calibrated
                        p.observer = None
                        skipped.add(name.split("/")[0])
                try:
                    runner(pipe, video, prompt, height=h, width=w, num_frames=nf, num_inference_steps=steps, generator=gen,
                           **dict(pipeline_kwargs or {}))
                except _Done:
                    pass
            if observer.measured_calls == 0:
                raise ValueError(
                    f"no attention call was measured on video {i}: the pipeline ran fewer than {recorded[-1] + 1} steps, "
                    "or the adapters could not tell its target/context layout"
                )
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        logger.warning("calibrated the main transformer only; not calibrated: %s", ", ".join(sorted(skipped)))
    if not stats.layers:
        raise ValueError("no attention call was measured: the adapters could not tell the pipeline's target/context layout")
    tr = pipe.transformer
    meta = {
        "pipeline_class": type(pipe).__name__,
        "transformer_class": type(tr).__name__,
        "config_hash": config_hash(tr),
        "resolution": [shape[0], shape[1]],
        "frames": shape[2],
        "tokens": observer.tokens,  # per attention call; apply_isa warns when a run's differ
        "steps": steps,
        "calibrated_steps": recorded,
        "num_samples": len(videos),
        "cfg_branches": "all transformer calls (cond and uncond when guidance is on)",
    }
    return stats, meta


def calibrate(pipe, videos: Sequence[VideoArg], prompts: Union[str, Sequence[str], None] = None, *, budget=0.05,
              cost_model=None, per_head: Union[bool, str] = "auto", margin: float = 0.85, **record_kwargs):
    """Measure (:func:`record`) and fit (:func:`~isa_plugin.calibration.fit_profile`): a ready profile.

    Args:
        budget: relative L1 budget of the attention output (one number, or ``(target, context)``).
        cost_model: a :class:`CostModel`; default :func:`load_cost_model` (the kernel benchmark's file
            when present).
        per_head, margin: see :func:`fit_profile`.
        **record_kwargs: see :func:`record`.

    Returns:
        ``(profile, stats)``.

    Example:
        >>> profile, _ = calibrate(pipe, ["a.mp4", "b.mp4"], "make it winter", budget=0.05, steps=30)
        >>> profile.save("profile.yaml"); isa_plugin.apply_isa(pipe, profile)
    """
    from .cost import load_cost_model
    from .fit import fit_profile, parse_budget

    parse_budget(budget)  # fail before the long run
    stats, meta = record(pipe, videos, prompts, **record_kwargs)
    profile = fit_profile(stats, budget, cost_model or load_cost_model(), per_head=per_head, margin=margin, metadata=meta)
    return profile, stats
