"""Alias of :mod:`isa_plugin.adapters.families.flux`, kept so that existing imports keep working."""

from .families.flux import *  # noqa: F401,F403
from .families.flux import __all__  # noqa: F401

