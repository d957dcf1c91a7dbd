"""ISA executors: Triton kernels, FlexAttention and the pure-PyTorch reference they are tested against.

Executors run a plan (:class:`~isa_plugin.plan.BlockPlan`, or an executor's own compiled form such as
:class:`~isa_plugin.kernels.compact.CompactPlan`) and know nothing of the selection modes that made it.
"""
