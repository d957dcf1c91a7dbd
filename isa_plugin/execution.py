"""Executors: what runs an ISA call's plan, and the registry that finds one by name (the executors are in
:mod:`isa_plugin.executors`).

An executor runs plans (:class:`~isa_plugin.plan.BlockPlan`, or a compiled form of its own) and knows
nothing of the selection modes that make them. :class:`Executor` is its interface to routing
(:func:`isa_plugin.attention.select_backend`): whether it can serve a call (:meth:`Executor.ineligible`)
and running one (:meth:`Executor.run`: plan with the config's mode, then execute). Its two halves,
:meth:`Executor.plan` and :meth:`Executor.execute`, let a layer execute a plan made at an earlier step
(:mod:`isa_plugin.plan_reuse`). ``ISAConfig(backend=name)``
asks for one by name; a mode lists the executors it prefers on a GPU (``SelectionMode.executors``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .named import NamedRegistry

__all__ = ["Executor", "register_executor", "get_executor", "registered_executors"]

class Executor:
    """Base class of an executor. Subclasses set ``name`` and implement :meth:`ineligible` and :meth:`run`."""

    name: str = ""

    def ineligible(self, q: torch.Tensor, config) -> Optional[str]:
        """Why this executor cannot serve a call with these inputs and config (None when it can): a sentence
        naming the unsupported value and what is supported. Only device, dtype, shape and strides of ``q``
        and the config's block size and pseudo-key size are read."""
        raise NotImplementedError

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, config, scale: float) -> Any:
        """The call's plan in this executor's form (a :class:`~isa_plugin.plan.BlockPlan` or a compiled form)."""
        raise NotImplementedError

    def execute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, config, scale: float, plan: Any) -> torch.Tensor:
        """Execute ``plan`` (from :meth:`plan`, possibly for earlier inputs of the same shape) on q, k, v."""
        raise NotImplementedError

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, config, scale: float) -> torch.Tensor:
        """Plan the call with ``config``'s mode and execute it; q, k, v [B, N, H, D] -> [B, N, H, D]."""
        return self.execute(q, k, v, layout, config, scale, self.plan(q, k, v, layout, config, scale))


def register_executor(executor: Executor) -> Executor:
    """Make ``executor`` available by its name (``ISAConfig(backend=name)``).

    Raises:
        TypeError: not an :class:`Executor`. ValueError: no name, or the name is taken by another executor.
    """
    return _EXECUTORS.register(executor)


def get_executor(name: str) -> Executor:
    """The registered executor called ``name``.

    Raises:
        ValueError: no such executor (the message lists the registered ones).
    """
    return _EXECUTORS.get(name)


def registered_executors() -> Dict[str, Executor]:
    """Name -> executor, in registration order."""
    return _EXECUTORS.all()


_EXECUTORS: NamedRegistry[Executor] = NamedRegistry("executor", Executor)
