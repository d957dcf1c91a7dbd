"""Alias module kept so that existing imports keep working; the code lives in :mod:`.context`,
:mod:`.processor`, :mod:`.registry` and :mod:`.install` (re-exported by :mod:`isa_plugin.adapters`)."""

from . import *  # noqa: F401,F403
from . import __all__  # noqa: F401
