"""Reuse of a layer's plan across denoising steps (``ISAConfig(plan_reuse=k)``): the one rule of when to plan.

A layer with ``plan_reuse = k`` plans at one denoising step and executes that plan, with each new step's q,
k, v, for the next ``k - 1`` steps; then it plans again. The step of a call is read from its timestep (the
scalar :func:`~isa_plugin.timesteps.timestep_scalar` gives): a new value starts a new step, and calls that
repeat a step's timestep (the two branches of classifier-free guidance run as separate calls) each keep
their own plan, by their order within the step. A timestep above the previous one starts a new run, and
every plan is dropped. Calls without a timestep count one step each. A plan is only reused for a call of the
same executor, shape, dtype, device, layout and config.

Reuse needs eager execution: under ``torch.compile`` every call plans afresh (the store is not traced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Optional, Tuple

__all__ = ["PlanStore", "StepClock"]


@dataclass
class StepClock:
    """Turns the timesteps of a layer's calls into (step, branch) pairs.

    ``step`` counts denoising steps since the run began (a run begins at the first call, or when the timestep
    goes up); ``branch`` numbers the calls within one step (0, 1, ... for separate CFG calls).
    """

    step: int = -1
    branch: int = 0
    last: Optional[float] = None
    runs: int = 0

    def tick(self, timestep: Optional[float]) -> Tuple[int, int, bool]:
        """Advance for one call with ``timestep`` (None: a call without one, a step of its own).

        Returns:
            ``(step, branch, new_run)``.
        """
        new_run = False
        if timestep is None or self.last is None or timestep != self.last:
            if timestep is not None and self.last is not None and timestep > self.last:
                new_run = True
            if self.step < 0 or new_run:
                self.runs += 1
                new_run = True
                self.step = 0
            else:
                self.step += 1
            self.branch = 0
        else:
            self.branch += 1
        self.last = timestep
        return self.step, self.branch, new_run


@dataclass
class PlanStore:
    """The plans of one layer, kept for reuse across steps (see the module docstring).

    Attributes:
        clock: the layer's :class:`StepClock`.
        plans: branch -> (key, step planned, plan).
        planned, reused: counts of calls that planned / that ran a kept plan.
    """

    clock: StepClock = field(default_factory=StepClock)
    plans: Dict[int, Tuple[Hashable, int, Any]] = field(default_factory=dict)
    planned: int = 0
    reused: int = 0

    def lookup(self, timestep: Optional[float], key: Hashable, reuse: int) -> Tuple[Optional[Any], int]:
        """The kept plan for this call, or None when the call must plan (then :meth:`keep` its plan).

        Args:
            timestep: the call's timestep scalar (None when it has none).
            key: what a plan must match to be reused (executor, shapes, layout, config).
            reuse: the config's ``plan_reuse`` (steps one plan serves).

        Returns:
            ``(plan or None, branch)``; pass the branch to :meth:`keep`.
        """
        step, branch, new_run = self.clock.tick(timestep)
        if new_run:
            self.plans.clear()
        held = self.plans.get(branch)
        if held is not None and held[0] == key and step - held[1] < reuse:
            self.reused += 1
            return held[2], branch
        self.plans.pop(branch, None)
        return None, branch

    def keep(self, branch: int, key: Hashable, plan: Any) -> None:
        """Hold ``plan`` (made at the current step) for the later calls of ``branch``."""
        self.planned += 1
        self.plans[branch] = (key, self.clock.step, plan)

    def clear(self) -> None:
        """Drop every plan and restart the step count."""
        self.plans.clear()
        self.clock = StepClock()
