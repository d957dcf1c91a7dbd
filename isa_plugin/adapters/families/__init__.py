"""One module per model family; :func:`isa_plugin.adapters.load_adapter_modules` imports every module here.

A family module defines its processors (subclasses of
:class:`~isa_plugin.adapters.processor.ISAAttnProcessorBase`), its :class:`~isa_plugin.adapters.FamilyAdapter`
and the pipelines it serves, and registers them (see :mod:`isa_plugin.adapters.registry`).
"""
