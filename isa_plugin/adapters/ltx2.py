"""Alias of :mod:`isa_plugin.adapters.families.ltx2`, kept so that existing imports keep working."""

from .families.ltx2 import *  # noqa: F401,F403
from .families.ltx2 import __all__  # noqa: F401
from .rope import rope_split_halves  # noqa: F401
