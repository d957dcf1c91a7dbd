"""ISA configuration: the selection mode and its settings, the block size, the backend, plan sharing and plan reuse."""

from __future__ import annotations

import json
import numbers
from typing import Any, Dict, Optional

import torch

from .execution import registered_executors
from .selection import DEFAULT_MODE, SelectionMode, get_mode

__all__ = ["ISAConfig", "BACKENDS"]

#: ``ISAConfig.backend`` values of the package (``"auto"`` and its executors, :mod:`isa_plugin.executors`); an
#: executor registered elsewhere (``register_executor``) is accepted by its name too
BACKENDS = ("auto", "reference", "triton", "sparse", "flex")

_COMMON = ("block_size", "backend", "share_plan", "plan_reuse")


class ISAConfig:
    """Settings of one ISA attention call: a selection mode with its settings, plus what every mode shares.

    Args:
        mode: the selection mode (:mod:`isa_plugin.selection`): ``"fixed"`` (ISA's ratios, ``ISA.md``;
            default), ``"adaptive"`` (``docs/ADAPTIVE.md``) or any registered mode.
        block_size: tokens per block (each span is blocked separately). Default 64.
        backend: ``"auto"`` (a GPU executor on CUDA when one can serve the call, else the PyTorch reference),
            ``"reference"``, or an executor's name (``"triton"``: ISA's Triton kernels; ``"sparse"``: the
            block-sparse Triton executor of any plan; ``"flex"``: FlexAttention).
        share_plan: compute one plan for the whole batch, from the batch mean of the block means q̄, k̄,
            and use it for every batch entry (e.g. the cond/uncond pair of classifier-free guidance).
            Default False: every batch entry gets its own selections. The pseudo-keys stay per entry.
        plan_reuse: denoising steps one plan serves inside a model (:mod:`isa_plugin.plan_reuse`): a layer
            plans at one step and executes that plan, with the new q, k, v, for the next ``plan_reuse - 1``
            steps. Default 1 (plan every call). ``isa calibrate --plan-reuse K`` picks it per layer where
            the measured error of stale plans holds the budget.
        **settings: the mode's settings. The fixed mode: ``alpha_s`` (fraction of context key blocks
            kept, default 0.125), ``alpha_f`` (fraction of query blocks computed exactly, 0.5), ``alpha_ns``
            (fraction of KV' blocks each other query block computes exactly, 0.0625), ``sharpness``
            (``"topk_mass"`` or ``"l2"``) and ``topk_fraction``. The adaptive mode: ``mass``,
            ``context_mass``, ``min_blocks``, ``max_blocks``, ``pseudo_block`` and ``alpha_s``. Ratios may be
            one value per head.

    Settings are read as attributes (``config.alpha_s``); ``config.settings`` is the mode's settings object
    and ``config.selection`` the mode.

    Raises:
        TypeError / ValueError: an unknown mode, backend or setting (a setting of another mode names that
            mode), or a value of the wrong type or range, naming the field.

    Example:
        >>> cfg = ISAConfig(alpha_s=0.25, alpha_f=(0.5, 0.75))   # per-head alpha_f for 2 heads
        >>> ISAConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> ada = ISAConfig(mode="adaptive", mass=(0.9, 0.95), pseudo_block=16, alpha_s=0.5)
        >>> ISAConfig.decode(ada.encode()) == ada
        True
    """

    __slots__ = ("mode", "block_size", "backend", "share_plan", "plan_reuse", "selection", "settings", "_encoded")

    def __init__(self, mode: str = DEFAULT_MODE, *, block_size: int = 64, backend: str = "auto", share_plan: bool = False,
                 plan_reuse: int = 1, **settings):
        if not isinstance(mode, str):
            raise TypeError(f"ISAConfig.mode={mode!r} must be a mode name such as {DEFAULT_MODE!r}")
        selection = get_mode(mode)
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
            raise ValueError(f"ISAConfig.block_size={block_size!r} must be a positive integer (default 64)")
        if backend not in BACKENDS and backend not in registered_executors():
            raise ValueError(f"ISAConfig.backend={backend!r} is not supported; supported: "
                             f"{list(dict.fromkeys(BACKENDS + tuple(registered_executors())))}")
        if not isinstance(share_plan, bool):
            raise TypeError(f"ISAConfig.share_plan={share_plan!r} must be True or False")
        if isinstance(plan_reuse, bool) or not isinstance(plan_reuse, numbers.Integral) or plan_reuse < 1:
            raise ValueError(f"ISAConfig.plan_reuse={plan_reuse!r} must be a positive integer (steps one plan serves; "
                             "1 = plan every call)")
        values = selection.settings(int(block_size), **settings)
        for name, value in (("mode", mode), ("block_size", int(block_size)), ("backend", backend),
                            ("share_plan", share_plan), ("plan_reuse", int(plan_reuse)), ("selection", selection),
                            ("settings", values)):
            object.__setattr__(self, name, value)
        # computed once so that traced code (torch.compile) only reads an attribute
        object.__setattr__(self, "_encoded", json.dumps(self.to_dict(), sort_keys=True))

    def __setattr__(self, name, value):
        raise AttributeError(f"ISAConfig is immutable; use config.replace({name}=...)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol lookups (torch.compile's guards ask for __dict__) are not settings
            raise AttributeError(name)
        settings = object.__getattribute__(self, "settings")
        try:
            return getattr(settings, name)
        except AttributeError:
            raise AttributeError(f"ISAConfig(mode={self.mode!r}) has no setting {name!r}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, ISAConfig) and self._encoded == other._encoded

    def __hash__(self) -> int:
        return hash(self._encoded)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"ISAConfig({inner})"

    def __reduce__(self):
        return (_from_json, (self._encoded,))

    # -------------------------------------------------------------- helpers
    @property
    def is_dense(self) -> bool:
        """True when ISA computes exactly dense attention with these settings (e.g. every fixed ratio 1)."""
        return self.selection.is_dense(self.settings)

    @property
    def pseudo_block_size(self) -> int:
        """Tokens per pseudo-key of this config's plans."""
        return self.selection.pseudo_block(self.settings, self.block_size)

    @property
    def pseudo_keys(self) -> str:
        """How this config's plans form their pseudo-keys: ``"mean"`` or ``"kmeans"`` (:mod:`isa_plugin.kernels.pseudo`)."""
        return self.selection.pseudo_keys(self.settings)

    @property
    def num_heads(self) -> Optional[int]:
        """The head count implied by per-head values, or None when all are scalars (-1 when they disagree)."""
        lens = {len(v) for n in self.selection.per_head_fields if isinstance(v := getattr(self.settings, n), tuple)}
        if len(lens) > 1:
            return -1
        return lens.pop() if lens else None

    def per_head(self, num_heads: int, device=None) -> Dict[str, torch.Tensor]:
        """Every per-head setting of the mode as a tensor of shape [num_heads] (float64; int64 for counts).

        Raises:
            ValueError: a per-head value whose length differs from ``num_heads``.
        """
        try:  # copies: the mode's planners share its cached tensors
            return {k: v.clone() for k, v in self.selection.per_head(self.settings, num_heads, device).items()}
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("ISAConfig.") else f"ISAConfig.{msg}") from None

    def select_heads(self, start: int, stop: int) -> "ISAConfig":
        """This config for heads ``start … stop − 1`` only: per-head values sliced, scalars kept."""
        settings = self.selection.select_heads(self.settings, start, stop)
        return self if settings is self.settings else self.replace(**self.selection.to_dict(settings))

    def replace(self, **changes) -> "ISAConfig":
        d = self.to_dict()
        d.update(changes)
        return ISAConfig.from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python dict (lists for per-head values), safe for YAML/JSON. A config of the default mode does
        not list ``mode``, one that plans every call does not list ``plan_reuse``."""
        d = self.selection.to_dict(self.settings)
        d.update(block_size=self.block_size, backend=self.backend, share_plan=self.share_plan)
        if self.plan_reuse != 1:
            d["plan_reuse"] = self.plan_reuse
        if self.mode != DEFAULT_MODE:
            d["mode"] = self.mode
        return d

    def encode(self) -> str:
        """The config as one JSON string, the form custom ops take."""
        return self._encoded

    @classmethod
    def decode(cls, text: str) -> "ISAConfig":
        """Inverse of :meth:`encode`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ISAConfig":
        """Inverse of :meth:`to_dict`. Unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise TypeError(f"ISAConfig.from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        mode = d.pop("mode", DEFAULT_MODE)
        selection: SelectionMode = get_mode(mode)
        known = set(selection.setting_names()) | set(_COMMON)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ISAConfig keys {unknown}; known keys: {sorted(known | {'mode'})}")
        common = {k: d.pop(k) for k in _COMMON if k in d}
        return cls(mode, **common, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _from_json(text: str) -> ISAConfig:
    return ISAConfig.decode(text)
