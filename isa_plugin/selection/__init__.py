"""Selection modes: how ISA decides, per call, which key blocks are kept and computed exactly.

Every mode is one module registered by name (:func:`register_mode`); ``ISAConfig(mode=name, ...)`` takes
the mode's settings. The package's modes: ``fixed`` (ISA's ratios, :mod:`.fixed`) and ``adaptive``
(per-query-block pooled mass, :mod:`.adaptive`).
"""

from . import fixed, adaptive  # noqa: F401  (registers the package's modes, the default first)
from .base import (DEFAULT_MODE, CandidateTable, SelectionMode, get_mode, plan_from_pooled, register_mode, registered_modes,
                   unregister_mode)

__all__ = ["SelectionMode", "CandidateTable", "register_mode", "unregister_mode", "get_mode", "registered_modes", "plan_from_pooled",
           "DEFAULT_MODE"]
