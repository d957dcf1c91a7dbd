"""Alias of :mod:`isa_plugin.adapters.families.wan`, kept so that existing imports keep working."""

from .families.wan import *  # noqa: F401,F403
from .families.wan import __all__  # noqa: F401

