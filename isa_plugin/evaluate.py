"""Dense vs ISA on the same edit: fidelity (PSNR/SSIM), per-layer attention error, attention and total time.

:func:`compare_edit` runs one edit twice with the same seed — once with the model's own dense attention,
once with ISA applied from a profile or config — and measures what a user decides on: how close the ISA
result is to the dense one, how much time self-attention and the whole call took, the attention-output
error of each ISA layer, and how many calls fell back to dense attention and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .metrics import l1_sums_by_kind, psnr, ssim

__all__ = ["EditRun", "compare_edit", "run_edit", "self_attention_modules"]

logger = logging.getLogger(__name__)


@dataclass
class EditRun:
    """One timed pipeline call. ``frames``: [F, H, W, C] float in [0, 1] (CPU)."""

    frames: torch.Tensor
    total_ms: float
    attention_ms: float
    attention_calls: int
    stats: Dict[str, Any] = field(default_factory=dict)


def self_attention_modules(pipe) -> Dict[str, torch.nn.Module]:
    """The attention modules ISA serves in ``pipe.transformer`` (name -> module)."""
    from .adapters import family_for

    tr = pipe.transformer
    return dict(family_for(tr).self_attention_layers(tr))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _progress_label(pipe, label: Optional[str]):
    """Label the pipeline's progress bar for the duration (keeping its other settings, e.g. ``disable``)."""
    old = getattr(pipe, "_progress_bar_config", None)
    if label is None or not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    pipe.set_progress_bar_config(**{**(old or {}), "desc": label})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**(old or {}))


def run_edit(pipe, video: torch.Tensor, prompt: str, *, height: int, width: int, frames: int, steps: int,
             seed: int, label: Optional[str] = None, **pipeline_kwargs) -> EditRun:
    """Run ``pipe`` once on ``video`` ([F, 3, H, W] in [0, 1]) and time it.

    ``label`` names the run on the pipeline's progress bar (e.g. ``"dense, run 1/2"``).

    Returns:
        an :class:`EditRun`; ``attention_ms`` is the summed forward time of the self-attention modules.
    """
    from .timing import time_modules

    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with _progress_label(pipe, label), time_modules(self_attention_modules(pipe).items()) as timer:
        _sync(device)
        t0 = time.perf_counter()
        out = pipe(prompt=prompt, video=video, height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, generator=gen, output_type="np", **pipeline_kwargs)
        _sync(device)
        total = (time.perf_counter() - t0) * 1e3
    result = out.frames[0]
    result = torch.as_tensor(result).float()
    return EditRun(frames=result, total_ms=total, attention_ms=timer.total_ms, attention_calls=timer.calls)


def _layer_errors(pipe, video, prompt, *, height, width, frames, steps, seed, measure_calls: int, pipeline_kwargs, label=None):
    """Relative L1 error of each ISA layer's output vs dense attention, target and context rows apart.

    Runs the edit once more with ISA, and on the first ``measure_calls`` transformer calls compares, per
    layer, the ISA output to dense attention on the very inputs the layer saw.
    """
    from .adapters import isa_processors, observe_attention, reset_stats
    from .attention import dense_attention, isa_attention

    procs = isa_processors(pipe)
    reset_stats(pipe)  # call indices restart at 0 for this pass
    sums: Dict[str, Dict[str, list]] = {}

    def observer(name, q, k, v, layout, step):
        proc = procs.get(name)
        if layout is None or proc is None or proc.config is None or step.call_index >= measure_calls:
            return
        call = l1_sums_by_kind(isa_attention(q, k, v, layout, proc.config), dense_attention(q, k, v), layout)
        acc = sums.setdefault(name, {"target": [0.0, 0.0], "context": [0.0, 0.0]})
        for key, (num, den) in call.items():
            acc[key][0] += num
            acc[key][1] += den

    with observe_attention(pipe, observer, dense=False), _progress_label(pipe, label):
        with torch.no_grad():
            gen = torch.Generator(device="cpu").manual_seed(seed)
            pipe(prompt=prompt, video=video, height=height, width=width, num_frames=frames,
                 num_inference_steps=steps, generator=gen, output_type="latent", **pipeline_kwargs)
    return {
        name: {k: (n / d if d > 0 else None) for k, (n, d) in acc.items()} for name, acc in sums.items()
    }


def compare_edit(pipe, profile_or_config, video: torch.Tensor, prompt: str, *, height: int, width: int, frames: int,
                 steps: int, seed: int = 0, measure_calls: int = 2, warmup: bool = True, repeats: int = 2,
                 label: Optional[str] = None, **pipeline_kwargs) -> Dict[str, Any]:
    """Dense vs ISA on one edit, same seed.

    Args:
        pipe: an ICL video pipeline served by the adapters, without ISA applied (a pipeline that runs ISA by
            default, such as ``LIVEditorPipeline``, is called with ``attention="dense"`` for the dense runs).
        profile_or_config: what :func:`isa_plugin.apply_isa` takes.
        video: [F, 3, H, W] in [0, 1]; height/width/frames: the edit's size; steps: denoising steps.
        measure_calls: transformer calls on which per-layer attention errors are measured.
        warmup: run each configuration once (1 step) before the first timed run (kernel compilation,
            caches, allocator), so that neither is timed cold.
        repeats: timed runs of each configuration, alternated dense, ISA, dense, ISA, ... so that a busy
            machine slows both alike; the median of each is reported.
        label: prefix of the progress-bar labels (each run is named: ``"<label> dense, run 1/2"``, ...).

    Returns:
        ``{"dense": EditRun, "isa": EditRun, "psnr": dB, "ssim": ..., "layer_errors": {...},
        "fallbacks": {layer: {reason: count}}, "isa_calls": n, "fallback_calls": n, "repeats": n,
        "timings": {...}}``. The two runs' ``total_ms`` and ``attention_ms`` are the medians over the repeats;
        ``timings`` lists every timed run: ``{"order": ["dense", "isa", ...], "warmup": bool, "statistic":
        "median", "dense": {"total_ms": [...], "attention_ms": [...]}, "isa": {...}}``.

    Raises:
        ValueError: ``repeats`` < 1.
    """
    import statistics

    from .adapters import apply_isa, remove_isa, reset_stats, stats
    from .adapters.defaults import attention_kwargs_for

    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    kw = dict(height=height, width=width, frames=frames, steps=steps, seed=seed, **pipeline_kwargs)
    dense_kw = {**kw, **attention_kwargs_for(pipe, "dense")}  # a pipeline that runs ISA by default is told not to
    runs: Dict[str, list] = {"dense": [], "isa": []}
    order = []
    name = (lambda what: f"{label} {what}") if label else (lambda what: what)

    def with_isa(fn):
        apply_isa(pipe, profile_or_config)
        try:
            return fn()
        finally:
            remove_isa(pipe)

    def timed_isa(r):
        reset_stats(pipe)
        run = run_edit(pipe, video, prompt, **kw, label=name(f"ISA, run {r + 1}/{repeats}"))
        run.stats = stats(pipe)
        return run

    with torch.no_grad():
        if warmup:
            run_edit(pipe, video, prompt, **{**dense_kw, "steps": 1}, label=name("dense warm-up"))
            with_isa(lambda: run_edit(pipe, video, prompt, **{**kw, "steps": 1}, label=name("ISA warm-up")))
        for r in range(repeats):
            runs["dense"].append(run_edit(pipe, video, prompt, **dense_kw, label=name(f"dense, run {r + 1}/{repeats}")))
            order.append("dense")
            runs["isa"].append(with_isa(lambda: timed_isa(r)))
            order.append("isa")
        errors = with_isa(lambda: _layer_errors(pipe, video, prompt, height=height, width=width, frames=frames, steps=steps,
                                                seed=seed, measure_calls=measure_calls, pipeline_kwargs=pipeline_kwargs,
                                                label=name("ISA, per-layer errors")))

    def median_run(rs):
        return dataclasses.replace(rs[-1], total_ms=statistics.median(r.total_ms for r in rs),
                                   attention_ms=statistics.median(r.attention_ms for r in rs))

    dense, isa = median_run(runs["dense"]), median_run(runs["isa"])
    fallbacks = {name: s.get("reasons", {}) for name, s in isa.stats.items() if s.get("fallbacks")}
    return {
        "dense": dense,
        "isa": isa,
        "psnr": psnr(dense.frames, isa.frames),
        "ssim": ssim(dense.frames, isa.frames),
        "layer_errors": errors,
        "fallbacks": fallbacks,
        "isa_calls": sum(s.get("isa_calls", 0) for s in isa.stats.values()),
        "fallback_calls": sum(s.get("fallbacks", 0) for s in isa.stats.values()),
        "repeats": repeats,
        "timings": {"order": order, "warmup": warmup, "statistic": "median",
                    **{k: {"total_ms": [r.total_ms for r in rs], "attention_ms": [r.attention_ms for r in rs]}
                       for k, rs in runs.items()}},
    }
