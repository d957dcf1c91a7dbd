"""Run a diffusers ICL pipeline densely on sample videos and collect calibration statistics.

The pipeline runs unmodified (dense attention: the adapters' processors in dense mode, installed by
:func:`isa_plugin.adapters.observe_attention`). At a few denoising steps spread over the schedule, every
self-attention call of the transformer (both CFG branches) is measured by
:meth:`CalibrationStats.observe`; after the last sampled step the run stops (no further steps, no VAE
decode). :func:`calibrate` then fits a :class:`~isa_plugin.ThresholdProfile`.

Per pipeline adapter a *runner* (:mod:`isa_plugin.calibration.runners`) turns (sample, prompt, size,
steps) into the pipeline call. Every transformer of the pipeline is measured (Wan 2.2's ``transformer_2``
layers are keyed ``"transformer_2/blocks.N.attn1"``), and statistics are kept per sample for the fit's
held-out check.

Memory: the recorder holds, per (layer, timestep bucket), the pooled and the per-sample statistics
(:class:`~isa_plugin.calibration.statistics.LayerErrorStats`, dominated by the fixed mode's ``num`` [H, 2, M, S, F, NS] float64)
and, during one call, the transient buffers of the fixed mode's measurement (:func:`~isa_plugin.selection.fixed_measure.measure_fixed_call`);
:func:`recorder_peak_bytes` computes both from those shapes.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..timesteps import bucket_edges, timestep_scalar
from ..selection import get_mode
from .statistics import CalibrationStats, Grid

__all__ = ["record", "run_samples", "calibrate", "StatsObserver", "sampled_steps", "recorder_peak_bytes"]

logger = logging.getLogger(__name__)

VideoArg = Union[str, Path, torch.Tensor]


class _Done(Exception):
    """Raised inside the transformer once every sampled step has been measured (ends the run early)."""


class _Keyed:
    """Forwards observations to ``observer`` under the layer key ``name`` (processors know only their local name)."""

    def __init__(self, observer, name: str):
        self.observer, self.name = observer, name

    def __call__(self, layer_name, *args):
        return self.observer(self.name, *args)


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

    def new_run(self, sample: Optional[int] = None) -> None:
        """Start a pipeline run on calibration sample ``sample`` (statistics are also kept per sample)."""
        self.sample = sample
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
            self.stats.observe(layer_name, q, k, v, layout, timestep=getattr(step_info, "timestep", None), sample=self.sample)


def _load_sample(v: VideoArg) -> torch.Tensor:
    """A calibration sample as frames [F, 3, H, W] in [0, 1]: a tensor, a video or image file, or a frame folder."""
    if isinstance(v, torch.Tensor):
        video = v.float()
        if video.ndim == 3:
            video = video[None]
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"a sample tensor must be [F, 3, H, W] (or an image [3, H, W]) in [0, 1]; got {tuple(v.shape)}")
        return video
    from .video import read_video

    return read_video(v)


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


def run_samples(pipe, videos: Sequence[VideoArg], prompts, observer, *, steps: int, measured_steps: Sequence[int],
                height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None, seed: int = 0,
                pipeline_kwargs: Optional[Dict[str, Any]] = None, adapter: Optional[str] = None, runner=None,
                progress: Optional[str] = None) -> Tuple[int, int, int]:
    """Run ``pipe`` densely on each sample with ``observer`` on every self-attention layer, up to the last of
    ``measured_steps`` (the one sample loop of :func:`record` and of the plan-reuse measurement).

    Args:
        observer: an ``observe_attention`` observer; when it has ``new_run(sample=i)`` it is called before
            sample ``i``; a :class:`StatsObserver` ends each run after its last step.
        steps: the schedule length; measured_steps: the steps observed (the progress bar counts them).
        height, width, frames, seed, pipeline_kwargs, adapter: as for :func:`record`; ``runner``: the
            calibration runner (default: the adapter's, or the one that serves the pipeline).
        progress: the label of a tqdm bar over samples × measured steps (None: no bar).

    Returns:
        ``(height, width, frames)`` of the first sample as run.

    Raises:
        ValueError: no samples, a prompt count that differs from the sample count, or a sample on which no
            attention call was observed.
    """
    from ..adapters import observe_attention
    from .runners import runner_for, runner_named

    videos = list(videos)
    if not videos:
        raise ValueError("calibration needs at least one sample")
    if prompts is None or isinstance(prompts, str):
        prompts = [prompts or ""] * len(videos)
    prompts = list(prompts)
    if len(prompts) == 1 and len(videos) > 1:
        prompts = prompts * len(videos)
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(prompts)} prompts for {len(videos)} samples; give one prompt, or one per sample")
    runner = runner or (runner_named(adapter) if adapter else runner_for(pipe))
    measured = sorted(int(x) for x in measured_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(videos) * len(measured), desc=progress, unit="step")
        if isinstance(observer, StatsObserver):
            observer.on_step = lambda _: bar.update(1)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return observer(*args)

    shape = None
    try:
        for i, (v, prompt) in enumerate(zip(videos, prompts)):
            sample, h, w, nf = runner.prepare(pipe, _load_sample(v), height=height, width=width, num_frames=frames)
            shape = shape or (h, w, nf)
            if hasattr(observer, "new_run"):
                observer.new_run(sample=i)
            before = calls[0]
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            with observe_attention(pipe, counted) as procs:
                for name, proc in procs.items():
                    if "/" in name:  # an extra transformer's layer (e.g. "transformer_2/blocks.0.attn1"): keep its key
                        proc.observer = _Keyed(counted, name)
                try:
                    runner.call(pipe, sample, prompt, height=h, width=w, num_frames=nf, steps=steps, generator=gen,
                                **dict(pipeline_kwargs or {}))
                except _Done:
                    pass
            if bar is not None and not isinstance(observer, StatsObserver):
                bar.update(len(measured))
            if calls[0] == before or getattr(observer, "measured_calls", 1) == 0:
                raise ValueError(
                    f"no attention call was measured on sample {i}: the pipeline ran fewer than {measured[-1] + 1} steps, "
                    "or the adapters could not tell its target/context layout"
                )
    finally:
        if bar is not None:
            bar.close()
    return shape


def record(pipe, videos: Sequence[VideoArg], prompts: Union[str, Sequence[str], None] = None, *, steps: int = 20,
           calib_steps: int = 4, height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None,
           grid: Optional[Grid] = None, block_size: int = 64, blocks_per_kind: int = 48, tokens_per_block: int = 16,
           timestep_buckets: int = 1, seed: int = 0, progress: bool = False, pipeline_kwargs: Optional[Dict[str, Any]] = None,
           adapter: Optional[str] = None) -> Tuple[CalibrationStats, Dict[str, Any]]:
    """Run ``pipe`` densely on each sample and measure ISA's error at ``calib_steps`` of ``steps`` steps.

    Args:
        pipe: a diffusers ICL pipeline with a calibration runner (:mod:`isa_plugin.calibration.runners`).
        videos: the samples: paths (video file, image file or frame folder) or [F, 3, H, W] tensors in [0, 1];
            what a sample means depends on the pipeline (its runner's ``inputs``).
        prompts: one prompt for all samples or one per sample (default ``""``).
        steps: the denoising schedule length; ``calib_steps`` steps spread over it are measured (every
            transformer call: CFG branches, both experts) and the run stops after the last one.
        height, width, frames: resize / trim the samples (default: their own size, rounded to what the model takes).
        grid, block_size, blocks_per_kind, tokens_per_block: see :class:`CalibrationStats`.
        timestep_buckets: measure this many timestep buckets separately (1 = one setting for all steps).
        progress: one tqdm bar (samples x measured steps, with ETA).
        pipeline_kwargs: extra keyword arguments for every pipeline call (e.g. ``guidance_scale``).
        adapter: the runner's adapter name (default: found from the pipeline's class).

    Returns:
        ``(stats, metadata)``; metadata is what the profile records under ``calibrated_on``.

    Raises:
        ValueError: no samples, a prompt count that differs from the sample count, or no attention call
            could be measured (the pipeline's layout is unknown to the adapters).
        TypeError: no runner serves the pipeline.

    Example:
        >>> stats, meta = record(pipe, ["a.mp4", "b.mp4"], "make it winter", steps=30)
    """
    from ..profile import config_hash
    from .runners import runner_for, runner_named

    videos = list(videos)
    runner = runner_named(adapter) if adapter else runner_for(pipe)
    recorded = sampled_steps(steps, calib_steps)
    edges = _timestep_edges(pipe, steps, recorded, timestep_buckets)
    stats = CalibrationStats(grid, block_size=block_size, timestep_edges=edges, blocks_per_kind=blocks_per_kind,
                             tokens_per_block=tokens_per_block, seed=seed)
    observer = StatsObserver(stats, recorded)
    shape = run_samples(pipe, videos, prompts, observer, steps=steps, measured_steps=recorded, height=height, width=width,
                        frames=frames, seed=seed, pipeline_kwargs=pipeline_kwargs, runner=runner,
                        progress=f"calibrating {runner.adapter}" if progress else None)
    if not stats.layers:
        raise ValueError("no attention call was measured: the adapters could not tell the pipeline's target/context layout")
    tr = pipe.transformer
    components = {}
    for comp in ("transformer_2",):
        extra_tr = getattr(pipe, comp, None)
        if extra_tr is not None:
            components[comp] = {"transformer_class": type(extra_tr).__name__, "config_hash": config_hash(extra_tr)}
    meta = {
        "pipeline_class": type(pipe).__name__,
        "adapter": runner.adapter,
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
    if components:
        meta["components"] = components  # the extra transformers' classes and config hashes
    return stats, meta


def recorder_peak_bytes(tokens: int, heads: int, head_dim: int, *, layers: int, transformers: int = 1, samples: int = 2,
                        buckets: int = 1, grid: Optional[Grid] = None, block_size: int = 64, blocks_per_kind: int = 48,
                        tokens_per_block: int = 16, max_chunk_elems: int = 1 << 28) -> Dict[str, int]:
    """The recorder's memory beyond the model's own forward, computed from its data structures' shapes.

    Two parts: the accumulated statistics (per transformer, layer and bucket one pooled and one per-sample
    :class:`LayerErrorStats`: every measured mode's ``zero_stats`` tensors, float64), and the largest
    transient set of the fixed mode's measurement of one call (float32): pooled
    q/k/v block means and logits/softmax [H, nb, nb] (x3), the variant weights [H, s, V, nb] (x2,
    V = S·(1 + NS)) with their boolean selection temporaries [S, H, s, NS, nb] (x4), and per head the
    gathered keys/values [nb, b, D] (x2), the score buffer [c·m, nb, b] and per-block numerators
    [nb, c·m, D] plus the variant outputs [c, V, m, D] (x2) of one chunk of c sampled blocks
    (c·m·nb·max(b, D) ≤ ``max_chunk_elems``).

    Returns:
        ``{"statistics": bytes, "transient": bytes, "total": bytes}``.

    Example:
        >>> recorder_peak_bytes(65520, 40, 128, layers=40, transformers=2)["total"] / 2**30   # Wan 14B, 480p 81f
    """
    g = grid or Grid()
    H, D = heads, head_dim
    per_stats = 8 * sum(t.numel() for n, mg in g.modes.items() for t in get_mode(n).zero_stats(H, mg, "meta").values())
    fixed = g.modes.get("fixed") or get_mode("fixed").grid_type()
    M, S, F, NS = fixed.shape
    statistics = per_stats * layers * transformers * buckets * (samples + 1)
    nb = -(-tokens // block_size)
    s = min(2 * blocks_per_kind, nb)
    m = min(tokens_per_block, block_size)
    V = S * (1 + NS)
    per_block = max(1, m * nb * max(block_size, D))
    c = max(1, min(s, max_chunk_elems // per_block))
    f4 = 4
    pooled = f4 * (3 * H * nb * D + 3 * H * nb * nb)
    variants = f4 * 2 * H * s * V * nb + 4 * S * H * s * NS * nb
    per_head = f4 * (2 * nb * block_size * D + c * m * nb * block_size + nb * c * m * D + 2 * c * V * m * D)
    transient = pooled + variants + per_head
    return {"statistics": int(statistics), "transient": int(transient), "total": int(statistics + transient)}


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
