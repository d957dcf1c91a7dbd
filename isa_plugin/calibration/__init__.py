"""Calibration: measure ISA's error against dense attention on a user's model and videos, fit a profile.

- :class:`CalibrationStats` / :func:`measure_call` (``stats``): per layer and head, the relative L1 error of
  every candidate (sharpness metric, α_s, α_f, α_ns) for target-query and context-query outputs.
- :func:`fit_profile` (``fit``): the cheapest setting per layer (per head where it pays) within a budget.
- :func:`load_cost_model` (``cost``): the kernel-time model the fit ranks settings by.
- :func:`calibrate` (``recorder``): run a diffusers pipeline densely on sample videos and collect statistics.
- ``synthetic``: a structured synthetic ICL attention workload for tests and benchmarks.
"""

from .cost import DEFAULT_COST_MODEL, CostModel, load_cost_model
from .fit import fit_profile, parse_budget
from .stats import CalibrationStats, Grid, LayerErrorStats, LayerStats, measure_call  # LayerStats: former name

__all__ = [
    "CalibrationStats",
    "Grid",
    "LayerErrorStats",
    "measure_call",
    "fit_profile",
    "parse_budget",
    "CostModel",
    "DEFAULT_COST_MODEL",
    "load_cost_model",
]
