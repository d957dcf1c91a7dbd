"""Which executor serves a call that leaves the choice to its mode (``ISAConfig(backend="auto")``).

The rule (:func:`choose_executor`), one place for every caller of :func:`~isa_plugin.attention.select_backend`:

1. the executors the mode lists (``SelectionMode.executors``) that can serve the call (``Executor.ineligible``);
2. when more than one can, the mode counts the call's pairs before planning (``SelectionMode.call_pairs``) and
   the device's cost model (:func:`~isa_plugin.calibration.cost.load_cost_model`, the card's ``executors``
   coefficients as ``benchmarks/bench_pareto.py --executor-costs`` measured them) predicts each one's time:
   the fastest serves (the mode's order breaks ties);
3. otherwise (a mode whose pairs depend on the inputs, a card without measured coefficients for every eligible
   executor, the CPU) the first eligible executor in the mode's order serves.

The choice reads only shapes, dtypes, the layout and the config (no device value), and is cached per call shape.
Inside ``torch.compile`` the mode's order decides (no cost-model lookup in the traced graph).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from .execution import get_executor

__all__ = ["choose_executor", "predicted_times"]


@functools.lru_cache(maxsize=8)
def _device_cost_model(device_name: str):
    from .calibration.cost import load_cost_model

    return load_cost_model(device_name=device_name)


def predicted_times(names: Sequence[str], q: torch.Tensor, layout, config, model=None) -> Optional[dict]:
    """Predicted time of the call on each of ``names`` by ``model`` (default: the cost model of q's CUDA device),
    or None when the mode cannot count the call's pairs before planning or the model lacks one of the executors.

    Example:
        >>> predicted_times(["triton", "sparse"], q, layout, ISAConfig(block_size=128))  # doctest: +SKIP
        {'triton': 55.1, 'sparse': 71.9}
    """
    B, _, H, D = q.shape
    pairs = config.selection.call_pairs(config.settings, layout, config.block_size, H)
    if pairs is None:
        return None
    if model is None:
        model = _device_cost_model(torch.cuda.get_device_name(q.device))
    times = {n: model.executor_time(n, pairs[0] * B, pairs[1] * B, D) for n in names}
    return None if any(t is None for t in times.values()) else times


def choose_executor(q: torch.Tensor, layout, config, names: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """The executor among ``names`` (in preference order) that serves the call (see the module docstring).

    Returns:
        ``(name, None)``, or ``(None, reason)`` when none of them can serve it (the last one's reason).
    """
    if torch.compiler.is_compiling():  # traced: no cache lookups or file reads in the graph; the mode's order decides
        return _choose(q, layout, config, tuple(names), rank=False)
    key = (tuple(names), tuple(q.shape), q.dtype, str(q.device), q.stride(-1), layout, config)
    try:
        return _choose_cached(key, q, layout, config, tuple(names))
    except TypeError:  # an unhashable layout or config: decided for this call
        return _choose(q, layout, config, tuple(names))


def _choose_cached(key, q, layout, config, names):
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _choose(q, layout, config, names)
        if len(_CHOICES) >= _MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = hit
    return hit


def _choose(q, layout, config, names, rank: bool = True) -> Tuple[Optional[str], Optional[str]]:
    eligible, why_not = [], None
    for name in names:
        why_not = get_executor(name).ineligible(q, config)
        if why_not is None:
            eligible.append(name)
    if not eligible:
        return None, why_not
    if rank and len(eligible) > 1 and q.is_cuda:
        times = predicted_times(eligible, q, layout, config)
        if times is not None:
            return min(eligible, key=lambda n: (times[n], eligible.index(n))), None
    return eligible[0], None


_CHOICES: dict = {}
_MAX_CHOICES = 256
