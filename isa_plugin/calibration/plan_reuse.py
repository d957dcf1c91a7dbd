"""Calibration of plan reuse across denoising steps: measure the error of stale plans, pick ``plan_reuse``.

:func:`measure_plan_reuse` runs the pipeline densely on samples for the whole schedule, and at every
self-attention call of a profile's ISA layer executes, on the call's own q, k, v, the plans that the
layer's setting made 0, 1, …, ``max_reuse − 1`` steps earlier (the same branch of the step, as
:mod:`isa_plugin.plan_reuse` keeps them; steps counted by its :class:`~isa_plugin.plan_reuse.StepClock`).
Each output is compared with dense attention (relative L1 over target-query and context-query rows,
:func:`isa_plugin.metrics.l1_sums_by_kind`); the worst call per (layer, age) is kept. Inputs change from
step to step, so the errors measure how far a plan drifts.

:func:`choose_plan_reuse` gives each layer the largest ``k`` whose ages ``0 … k − 1`` all stayed within
``margin × budget`` on both query kinds, and writes it into the profile's settings
(``ISAConfig.plan_reuse``); ``isa calibrate --plan-reuse K`` runs both after the fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import dense_attention, select_backend
from ..execution import get_executor
from ..metrics import l1_sums_by_kind
from ..plan_reuse import StepClock
from ..timesteps import timestep_scalar

__all__ = ["ReuseErrors", "measure_plan_reuse", "choose_plan_reuse"]

logger = logging.getLogger(__name__)


@dataclass
class ReuseErrors:
    """Worst relative L1 error per layer and plan age: ``errors[layer][age] = (target, context)``.

    Attributes:
        max_reuse: the largest ``plan_reuse`` measured (ages ``0 … max_reuse − 1``).
        calls: measured attention calls per layer.
    """

    max_reuse: int
    errors: Dict[str, Dict[int, Tuple[float, float]]] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)

    def add(self, layer: str, age: int, err_t: Optional[float], err_c: Optional[float]) -> None:
        t0, c0 = self.errors.setdefault(layer, {}).get(age, (0.0, 0.0))
        self.errors[layer][age] = (max(t0, err_t or 0.0), max(c0, err_c or 0.0))

    def table(self) -> str:
        """A markdown table: layer, then the worst target / context error per age."""
        ages = range(self.max_reuse)
        lines = ["| layer | " + " | ".join(f"age {a}" for a in ages) + " |", "|---|" + "---|" * self.max_reuse]
        for name, per_age in self.errors.items():
            cells = [f"{per_age[a][0]:.4f} / {per_age[a][1]:.4f}" if a in per_age else "–" for a in ages]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


class _ReuseObserver:
    """``observe_attention`` observer: per call, the setting's fresh and kept plans against dense attention."""

    def __init__(self, profile, result: ReuseErrors):
        self.profile, self.result = profile, result
        self.clocks: Dict[str, StepClock] = {}
        self.kept: Dict[Tuple[str, int], List[Tuple[int, Any, Any]]] = {}  # (layer, branch) -> [(step, key, plan)]

    def __call__(self, layer, q, k, v, layout, step_info) -> None:
        if layout is None or layer not in self.profile.layers:
            return
        t = timestep_scalar(getattr(step_info, "timestep", None))
        setting = self.profile.setting(layer, t)
        clock = self.clocks.setdefault(layer, StepClock())
        step, branch, new_run = clock.tick(t)
        if new_run:
            for key in [x for x in self.kept if x[0] == layer]:
                del self.kept[key]
        config = setting.to_config(self.profile.block_size)
        if config is None:
            return
        route = select_backend(q, layout, config)
        if route.backend == "dense":
            return
        ex, sc = get_executor(route.backend), q.shape[-1] ** -0.5
        key = (route.backend, tuple(q.shape), layout, config)
        with torch.no_grad():
            ref = dense_attention(q, k, v)
            fresh = ex.plan(q, k, v, layout, config, sc)
            kept = [(s, p) for s, kk, p in self.kept.get((layer, branch), []) if kk == key]
            for s, plan in [(step, fresh)] + kept:
                age = step - s
                if age < self.result.max_reuse:
                    sums = l1_sums_by_kind(ex.execute(q, k, v, layout, config, sc, plan), ref, layout)
                    self.result.add(layer, age, *(n / d if d > 0 else None for n, d in sums.values()))
        held = [(step, key, fresh)] + [(s, kk, p) for s, kk, p in self.kept.get((layer, branch), [])
                                       if step - s < self.result.max_reuse - 1]
        self.kept[(layer, branch)] = held
        self.result.calls[layer] = self.result.calls.get(layer, 0) + 1


def measure_plan_reuse(pipe, profile, videos: Sequence[Any], prompts=None, *, max_reuse: int = 4, steps: int = 20,
                       progress: bool = False, **run_kwargs) -> ReuseErrors:
    """Errors of plans reused for up to ``max_reuse`` steps, on every step of dense runs of ``pipe``.

    Args:
        pipe: the calibrated pipeline (without ISA applied: its attention runs densely while measured).
        profile: the :class:`~isa_plugin.ThresholdProfile` whose settings make the plans.
        videos, prompts: samples as for :func:`~isa_plugin.calibration.record`.
        max_reuse: the largest ``plan_reuse`` to measure (≥ 2).
        steps: the denoising schedule (every step is measured).
        progress: a tqdm bar over samples × steps.
        **run_kwargs: ``height``, ``width``, ``frames``, ``seed``, ``pipeline_kwargs``, ``adapter`` as for
            :func:`~isa_plugin.calibration.record`.

    Returns:
        :class:`ReuseErrors`.

    Raises:
        ValueError: ``max_reuse`` below 2; no ISA layer of the profile was called.

    Example:
        >>> errors = measure_plan_reuse(pipe, profile, ["a.mp4"], "make it winter", max_reuse=3, steps=30)
    """
    from .recorder import run_samples

    if isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 2:
        raise ValueError(f"max_reuse={max_reuse!r} must be an integer >= 2 (the largest plan_reuse to measure)")
    result = ReuseErrors(int(max_reuse))
    run_samples(pipe, videos, prompts, _ReuseObserver(profile, result), steps=steps, measured_steps=list(range(steps)),
                progress="measuring plan reuse" if progress else None, **run_kwargs)
    if not result.errors:
        raise ValueError("no ISA layer of the profile was called: the profile does not match the pipeline's layers")
    return result


def choose_plan_reuse(profile, errors: ReuseErrors, budget, margin: float = 0.85):
    """The profile with ``plan_reuse`` per layer: the largest ``k ≤ max_reuse`` whose ages ``0 … k − 1`` all
    stayed within ``margin × budget`` on both query kinds (1 where even age 1 did not). Layers without
    measurements keep their settings.

    Returns:
        a new :class:`~isa_plugin.ThresholdProfile`.
    """
    import copy
    import dataclasses

    from .fit import parse_budget

    b = parse_budget(budget)
    bt, bc = margin * b["target"], margin * b["context"]
    out = copy.deepcopy(profile)
    for name, per_age in errors.errors.items():
        k = 1
        while k < errors.max_reuse and k in per_age and per_age[k][0] <= bt and per_age[k][1] <= bc:
            k += 1
        out.layers[name] = [s if s.dense else dataclasses.replace(s, config=s.config.replace(plan_reuse=k))
                            for s in out.layers[name]]
        logger.info("%s: plan_reuse=%d", name, k)
    return out
