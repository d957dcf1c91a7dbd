"""Alias of :mod:`isa_plugin.calibration.measure`, kept so that existing imports keep working (the module
was renamed so that ``stats`` names one thing: :func:`isa_plugin.stats`, the per-layer counters)."""

from .measure import *  # noqa: F401,F403
from .measure import __all__  # noqa: F401
