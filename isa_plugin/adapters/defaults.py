"""ISA a pipeline runs by default: installed by the pipeline, the user's own installation kept, set aside for dense calls.

A model trained with ISA in the loop (LIVEditor-14B) is meant to run with it, so its pipeline runs ISA without
the user calling :func:`~isa_plugin.apply_isa`. The pipeline wraps its denoising loop in
:func:`attention_for_call`:

- ``"isa"``: ISA processors the user installed (:func:`~isa_plugin.apply_isa`, :class:`~isa_plugin.ISAProcessor`,
  :func:`~isa_plugin.adapters.observe_attention`) serve the call as they are. Otherwise the pipeline's settings
  are installed with :func:`~isa_plugin.apply_isa` and marked as the pipeline's default
  (``ISAState.default_of``). They stay installed after the call, so :func:`isa_plugin.stats` counts every
  call since; :func:`isa_plugin.remove_isa` removes them (the next ``"isa"`` call installs them again), and
  :func:`~isa_plugin.apply_isa`, :class:`~isa_plugin.ISAProcessor` and
  :func:`~isa_plugin.adapters.observe_attention` replace them.
- ``"dense"``: the model's own attention processors serve the call. Installed ISA processors (the user's or
  the pipeline's) are set aside for its duration and put back afterwards, with their counters and call
  index as they were.

Example:
    >>> with attention_for_call(pipe, "isa", lambda: (ISAConfig(), LIVEditorLayout(blocking="sequence"))):
    ...     run_the_denoising_loop()
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..config import ISAConfig
from ..validation import validate_choice
from .context import LayoutSpec
from .install import apply_isa, isa_processors
from .parallel import carry_settings

__all__ = ["ATTENTION_MODES", "check_attention", "runs_isa_by_default", "attention_kwargs_for", "user_isa_applied",
           "attention_for_call"]

#: ``attention=`` values of a pipeline that runs ISA by default (the pipeline resolves ``"auto"``)
ATTENTION_MODES = ("auto", "isa", "dense")


def check_attention(value) -> str:
    """``value`` if it is one of :data:`ATTENTION_MODES`.

    Raises:
        ValueError: any other value, naming it and the allowed ones.
    """
    return validate_choice("attention", value, ATTENTION_MODES)


def runs_isa_by_default(pipe) -> bool:
    """True for a pipeline that runs ISA by default, i.e. whose call takes ``attention=`` (:data:`ATTENTION_MODES`)."""
    try:
        return "attention" in inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin __call__
        return False


def attention_kwargs_for(pipe, mode: str) -> Dict[str, str]:
    """Call arguments that make ``pipe`` run with ``mode`` (``"isa"`` or ``"dense"``) when it runs ISA by default.

    Tools that compare dense and ISA runs (``isa edit --dense``, :func:`isa_plugin.evaluate.compare_edit`) pass
    these: ``{"attention": mode}`` for such a pipeline, ``{}`` for any other (which is dense unless ISA is applied).

    Example:
        >>> pipe(prompt, video=frames, **attention_kwargs_for(pipe, "dense"))
    """
    check_attention(mode)
    return {"attention": mode} if runs_isa_by_default(pipe) else {}


def _transformers(pipe) -> List[torch.nn.Module]:
    """The pipeline's modules that have ISA processors installed (compiled modules unwrapped)."""
    out = []
    for comp in pipe.components.values():
        module = getattr(comp, "_orig_mod", comp)
        if isinstance(module, torch.nn.Module) and isa_processors(module):
            out.append(module)
    return out


def user_isa_applied(pipe) -> bool:
    """True when ISA processors that the user installed (not the pipeline's default) serve ``pipe``."""
    return any(p.state.default_of is None for p in isa_processors(pipe).values())


def _install_default(pipe, settings: Callable[[], Tuple[ISAConfig, Optional[LayoutSpec]]]) -> None:
    config, layout = settings()
    try:
        apply_isa(pipe, config, layout=layout)
    except RuntimeError as e:
        raise RuntimeError(f"{type(pipe).__name__} runs ISA by default: {e}; or pass attention='dense'") from e
    for p in isa_processors(pipe).values():
        p.state.default_of = type(pipe).__name__


@contextlib.contextmanager
def _isa_set_aside(pipe) -> Iterator[None]:
    swapped: List[Tuple[torch.nn.Module, Any]] = []
    states = {}
    try:
        for transformer in _transformers(pipe):
            for p in isa_processors(transformer).values():
                module = transformer.get_submodule(p.layer_name)
                carry_settings(p, p.original)  # the backend / parallel config set while ISA was installed
                module.set_processor(p.original)
                swapped.append((module, p))
                states[id(p.state)] = (p.state, p.state.call_index)
        yield
    finally:
        for module, p in swapped:
            module.set_processor(p)
        for state, call_index in states.values():
            state.call_index = call_index


@contextlib.contextmanager
def attention_for_call(pipe, mode: str, settings: Callable[[], Tuple[ISAConfig, Optional[LayoutSpec]]]) -> Iterator[None]:
    """Run the block (one pipeline call) with ISA or with the model's dense attention (see the module docstring).

    Args:
        pipe: a diffusers pipeline whose transformer a registered family serves.
        mode: ``"isa"`` or ``"dense"`` (``"auto"`` is the pipeline's to resolve).
        settings: ``() -> (ISAConfig, layout)``, the pipeline's default ISA, called only when it is installed.

    Raises:
        ValueError: another ``mode``.
        RuntimeError: the default cannot be installed (e.g. the transformer is already compiled), naming
            ``attention='dense'`` as the way out.

    Example:
        >>> with attention_for_call(pipe, "dense", settings):
        ...     pipe.transformer(...)        # the model's own attention, ISA processors set aside
    """
    if check_attention(mode) == "auto":
        raise ValueError("attention_for_call takes 'isa' or 'dense'; the pipeline resolves 'auto'")
    if mode == "dense":
        with _isa_set_aside(pipe):
            yield
        return
    if not isa_processors(pipe):
        _install_default(pipe, settings)
    yield
