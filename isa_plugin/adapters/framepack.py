"""Alias of :mod:`isa_plugin.adapters.families.framepack`, kept so that existing imports keep working."""

from .families.framepack import *  # noqa: F401,F403
from .families.framepack import __all__  # noqa: F401
from .masking import attend_with_key_mask  # noqa: F401
