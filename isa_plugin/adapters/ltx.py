"""Alias of :mod:`isa_plugin.adapters.families.ltx`, kept so that existing imports keep working."""

from .families.ltx import *  # noqa: F401,F403
from .families.ltx import __all__  # noqa: F401
from .rope import rope_interleaved_channels  # noqa: F401
