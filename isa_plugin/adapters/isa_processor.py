""":class:`ISAProcessor`: ISA through diffusers' own ``set_attn_processor``.

``transformer.set_attn_processor(ISAProcessor(config_or_profile))`` (also ``pipe.transformer.set_attn_processor``)
does exactly what ``apply_isa(transformer, config_or_profile)`` does: the family's own ISA processor class on
each self-attention layer with that layer's config, every other attention layer (cross-attention, refiner
or audio streams) keeping the processor it runs, the per-call layout and timestep hooks, counters in
:func:`isa_plugin.stats`, and :func:`isa_plugin.remove_isa` restoring the very same processor objects.

How it knows the layers. ``set_attn_processor(processor)`` assigns one processor object to every attention
module, self- and cross-attention alike, so one object cannot tell which layer a call comes from. Given a
``dict`` keyed ``"<module path>.processor"``, diffusers instead checks its length against the model's
attention modules and then pops each module's entry into that module's ``set_processor``. An
:class:`ISAProcessor` is such a dict, filled when diffusers asks its length: the model is the ``self`` of the
``set_attn_processor`` call asking, so the processor runs :func:`isa_plugin.apply_isa`'s preparation for it
(with all its guard rails: a second apply, a compiled model, an unsupported class, a profile for another
model all raise there), holds the full processor mapping diffusers then installs, and attaches the hooks.
Nothing in diffusers is patched. One :class:`ISAProcessor` may be given to several transformers in turn
(e.g. ``transformer`` and ``transformer_2``).

Never a silent no-op: an :class:`ISAProcessor` that ends up as one module's processor (``attn.set_processor``,
or a value of another mapping) raises on its first call, naming the two ways to install ISA.

Families whose transformer has no ``set_attn_processor`` (HunyuanVideo-Framepack's lacks diffusers'
``AttentionMixin``) are served by :func:`isa_plugin.apply_isa` only.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Optional

import torch

from ..config import ISAConfig
from .context import LayoutSpec
from .install import attach_state, prepare_transformer

__all__ = ["ISAProcessor"]

#: the diffusers method whose length check binds an :class:`ISAProcessor` to its model
_ASKING_METHOD = "set_attn_processor"


class ISAProcessor(dict):
    """ISA for ``transformer.set_attn_processor(...)``: behaves exactly like :func:`isa_plugin.apply_isa`.

    Args:
        config_or_profile: as :func:`isa_plugin.apply_isa`: an :class:`~isa_plugin.ISAConfig` for every ISA
            layer, a mapping layer name -> ISAConfig or None (dense), or a threshold profile.
        layout: as :func:`isa_plugin.apply_isa`'s ``layout=`` (default: the family's inference from each call).

    The object is the per-layer mapping diffusers' ``set_attn_processor`` asks for (a ``dict`` it fills for
    the model asking; see :mod:`isa_plugin.adapters.isa_processor`); it is not itself an attention processor.

    Raises:
        TypeError: ``config_or_profile`` of another type; at ``set_attn_processor``: an unsupported
            transformer class (the message lists the supported ones).
        RuntimeError: at ``set_attn_processor``: ISA already applied (call :func:`isa_plugin.remove_isa` first),
            a model already compiled, no attention layer matched; on a call: installed on one module instead
            of through ``set_attn_processor``.
        ValueError: at ``set_attn_processor``: a mapping or profile that does not match the model's layers.

    Example:
        >>> pipe.transformer.set_attn_processor(isa_plugin.ISAProcessor(isa_plugin.ISAConfig()))
        >>> video = pipe(prompt, video=source_frames).frames[0]
        >>> isa_plugin.stats(pipe)["blocks.0.attn1"]["isa_calls"]
        50
        >>> isa_plugin.remove_isa(pipe)   # the stock processors again
    """

    def __init__(self, config_or_profile, *, layout: Optional[LayoutSpec] = None):
        super().__init__()
        ok = isinstance(config_or_profile, (ISAConfig, Mapping)) or hasattr(config_or_profile, "configs_for")
        if not ok:
            raise TypeError(
                "ISAProcessor takes an ISAConfig, a mapping layer name -> ISAConfig (or None), or a threshold profile; "
                f"got {type(config_or_profile).__name__}"
            )
        self.config_or_profile = config_or_profile
        self.layout = layout

    def __repr__(self) -> str:
        return f"ISAProcessor({self.config_or_profile!r}{'' if self.layout is None else f', layout={self.layout!r}'})"

    def __len__(self) -> int:
        model = self._asking_model()
        if model is not None:
            self.bind(model)
        return dict.__len__(self)

    def _asking_model(self) -> Optional[torch.nn.Module]:
        """The model whose ``set_attn_processor`` is asking this mapping's length (None for any other caller)."""
        frame = sys._getframe(2)  # 0: here, 1: __len__, 2: the code that called len()
        if frame.f_code.co_name != _ASKING_METHOD:
            return None
        model = frame.f_locals.get("self")
        if not isinstance(model, torch.nn.Module) or not any(v is self for v in frame.f_locals.values()):
            return None
        return model

    def bind(self, transformer: torch.nn.Module) -> None:
        """Prepare ISA on ``transformer`` as :func:`isa_plugin.apply_isa` does and hold the processor mapping its
        ``set_attn_processor`` installs next (called by the length check; the hooks are attached here).

        Raises:
            as :func:`isa_plugin.apply_isa`.
        """
        dict.clear(self)
        state, processors = prepare_transformer(transformer, self.config_or_profile, layout=self.layout)
        dict.update(self, processors)
        attach_state(transformer, state)

    def __call__(self, attn, *args, **kwargs):
        raise RuntimeError(
            f"an ISAProcessor was installed as the processor of one {type(attn).__name__} module; it serves a whole "
            "transformer: transformer.set_attn_processor(ISAProcessor(config)) or isa_plugin.apply_isa(pipe, config)"
        )
