"""Executors of ISA plans: the PyTorch reference, ISA's Triton kernels, the block-sparse Triton executor and
FlexAttention.

Each executor is one module registered by name (:func:`register_executor`); the modules of this package
are imported here, so that ``import isa_plugin.executors`` registers them all.
"""

from . import flex, reference, sparse, triton  # noqa: F401  (registers the package's executors)
from .base import Executor, get_executor, register_executor, registered_executors

__all__ = ["Executor", "register_executor", "get_executor", "registered_executors"]
