"""Executors of ISA plans: the PyTorch reference, ISA's Triton kernels, the block-sparse Triton executor and
FlexAttention.

Each executor is one module registered by name (:func:`isa_plugin.execution.register_executor`); the modules
of this package are imported here, so that ``import isa_plugin.executors`` registers them all.
"""

from . import flex, reference, sparse, triton  # noqa: F401  (registers the package's executors)
