"""Calibration: measure ISA's error against dense attention on a user's model and videos, fit a profile.

- :class:`Grid`, :class:`CalibrationStats` (``statistics``): per layer and head, the relative L1 error of
  every candidate of every measured selection mode for target-query and context-query outputs (each mode
  measures itself: :meth:`isa_plugin.selection.SelectionMode.measure`).
- :func:`fit_profile` (``fit``): the cheapest setting per layer (per head where it pays) within a budget
  (``solver``), checked on held-out samples (``heldout``).
- :func:`load_cost_model` (``cost``): the kernel-time model the fit ranks settings by.
- :func:`calibrate` (``recorder``): run a diffusers pipeline densely on samples and collect statistics;
  ``runners``: how each supported pipeline is called on a sample.
- :func:`measure_plan_reuse`, :func:`choose_plan_reuse` (``plan_reuse``): the error of plans kept for later
  denoising steps, and the ``plan_reuse`` of each layer that holds the budget.
- ``synthetic``: a structured synthetic ICL attention workload for tests and benchmarks.

Names resolve lazily, so ``isa_plugin.calibration.runners`` (used by ``isa calibrate --help``) loads no torch.
"""

import importlib

_LAZY = {
    "CostModel": ".cost", "DEFAULT_COST_MODEL": ".cost", "load_cost_model": ".cost",
    "fit_profile": ".fit", "parse_budget": ".fit",
    "CalibrationStats": ".statistics", "Grid": ".statistics", "LayerErrorStats": ".statistics",
    "calibrate": ".recorder", "record": ".recorder",
    "measure_plan_reuse": ".plan_reuse", "choose_plan_reuse": ".plan_reuse",
}

__all__ = [
    "CalibrationStats",
    "Grid",
    "LayerErrorStats",
    "fit_profile",
    "parse_budget",
    "CostModel",
    "DEFAULT_COST_MODEL",
    "load_cost_model",
    "calibrate",
    "record",
    "measure_plan_reuse",
    "choose_plan_reuse",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
