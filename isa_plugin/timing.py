"""Wall-clock timing of modules inside a model run (CUDA events on GPU, a synchronised clock on CPU)."""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterable, Iterator, Tuple

import torch

__all__ = ["ModuleTimer", "time_modules"]


class ModuleTimer:
    """Accumulated forward time of a set of modules; read :attr:`total_ms` after the run."""

    def __init__(self) -> None:
        self._cuda: list = []
        self._cpu_ms = 0.0
        self.calls = 0

    @property
    def total_ms(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
            self._cpu_ms += sum(a.elapsed_time(b) for a, b in self._cuda)
            self._cuda.clear()
        return self._cpu_ms


@contextlib.contextmanager
def time_modules(modules: Iterable[Tuple[str, torch.nn.Module]]) -> Iterator[ModuleTimer]:
    """Time every forward of ``modules`` (pairs of name and module) for the duration of the block.

    On CUDA each forward is bracketed with events (no synchronisation inside the run); on CPU the clock
    is read around it.

    Example:
        >>> with time_modules(family_for(tr).self_attention_layers(tr).items()) as t:
        ...     pipe(...)
        >>> t.total_ms
    """
    timer = ModuleTimer()
    handles = []
    starts: Dict[int, object] = {}

    def pre(module, args):
        p = next(module.parameters(), None)
        if p is not None and p.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            starts[id(module)] = ev
        else:
            starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        s = starts.pop(id(module))
        timer.calls += 1
        if isinstance(s, float):
            timer._cpu_ms += (time.perf_counter() - s) * 1e3
        else:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            timer._cuda.append((s, ev))

    for _, m in modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield timer
    finally:
        for h in handles:
            h.remove()
