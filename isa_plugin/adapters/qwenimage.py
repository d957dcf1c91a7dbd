"""Alias of :mod:`isa_plugin.adapters.families.qwenimage`, kept so that existing imports keep working."""

from .families.qwenimage import *  # noqa: F401,F403
from .families.qwenimage import __all__  # noqa: F401
from .masking import attend_with_key_mask  # noqa: F401
