"""Calibration statistics: the candidate grid, and what every measured (layer, timestep bucket) accumulates.

:class:`Grid` lists the selection modes a calibration measures and each mode's candidates.
:class:`CalibrationStats` measures every observed attention call with each mode of the grid
(:meth:`SelectionMode.measure <isa_plugin.selection.SelectionMode.measure>`) and accumulates the results
per (layer, timestep bucket) — and per calibration sample, for the held-out check — in
:class:`LayerErrorStats`. The sums stay on the device (a few tens of KB per layer) and move to the CPU when
read. :func:`~isa_plugin.calibration.fit.fit_profile` turns them into a profile.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..layout import CONTEXT, TARGET, TEXT, Layout
from ..selection import DEFAULT_MODE, get_mode, registered_modes
from ..selection.measure import Sampler
from ..timesteps import bucket_index, timestep_scalar

__all__ = ["Grid", "LayerErrorStats", "CalibrationStats", "KINDS"]

logger = logging.getLogger(__name__)

KINDS = ("target", "context")


class Grid:
    """The selection modes a calibration measures, each with its candidate settings.

    Args:
        modes: mode names to measure (each with its default grid unless ``candidates`` name its fields), or
            a mapping name -> that mode's grid object. None: the default mode (``fixed``) plus every mode
            one of whose own candidate fields is given (``Grid(mass=...)`` adds the adaptive mode).
        **candidates: candidate values by field name (``alpha_s``, ``alpha_f``, ``alpha_ns``, ``metrics``;
            ``mass``, ``pseudo_block`` ...); a field goes to every measured mode whose grid has it.

    Raises:
        ValueError / TypeError: an unknown mode or field, or candidate values a mode's grid refuses.

    Example:
        >>> sorted(Grid().modes)
        ['fixed']
        >>> sorted(Grid(mass=(0.8, 0.9), alpha_s=(0.5, 1.0)).modes)
        ['adaptive', 'fixed']
    """

    def __init__(self, modes: Optional[Any] = None, **candidates):
        registry = registered_modes()
        fields_of = {n: {f.name for f in dataclasses.fields(m.grid_type)} for n, m in registry.items() if m.grid_type}
        if isinstance(modes, Mapping):
            self.modes = {n: g for n, g in modes.items()}
            for n in self.modes:
                get_mode(n)
            return
        if modes is None:
            own = {n: fs - set().union(*(f for o, f in fields_of.items() if o != n)) for n, fs in fields_of.items()}
            names = [n for n in registry if n == DEFAULT_MODE or own.get(n, set()) & set(candidates)]
        else:
            names = [modes] if isinstance(modes, str) else list(modes)
            for n in names:
                get_mode(n)
        unknown = sorted(set(candidates) - set().union(*(fields_of.get(n, set()) for n in names)))
        if unknown:
            raise ValueError(f"Grid fields {unknown} are not candidates of the measured modes {names}; "
                             f"fields: { {n: sorted(fields_of.get(n, ())) for n in names} }")
        self.modes = {}
        for n in names:
            kw = {k: v for k, v in candidates.items() if k in fields_of.get(n, ())}
            self.modes[n] = registry[n].grid_type(**kw)

    @classmethod
    def defaults(cls, modes: Sequence[str], block_size: int) -> "Grid":
        """Every mode's default calibration grid for ``block_size`` (what ``isa calibrate --mode`` measures)."""
        return cls({n: get_mode(n).default_grid(block_size) for n in modes})

    def __eq__(self, other) -> bool:
        return isinstance(other, Grid) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Grid({self.to_dict()})"

    def to_dict(self) -> Dict[str, Any]:
        """Every mode's candidates in one mapping (a field shared by modes is listed once); ``modes`` is listed
        when the mode set cannot be told from the fields."""
        d: Dict[str, Any] = {}
        for n, g in self.modes.items():
            for k, v in get_mode(n).grid_to_dict(g).items():
                if k in d and d[k] != v:
                    raise ValueError(f"Grid field {k!r} differs between modes ({d[k]} vs {v}); give one value list")
                d.setdefault(k, v)
        if sorted(type(self).from_fields(d).modes) != sorted(self.modes):
            d["modes"] = list(self.modes)
        return d

    @classmethod
    def from_fields(cls, d: Mapping[str, Any]) -> "Grid":
        return cls(**{k: tuple(v) for k, v in d.items()})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        modes = d.pop("modes", None)
        return cls(modes, **{k: tuple(v) for k, v in d.items()})


@dataclass
class LayerErrorStats:
    """Accumulated statistics of one (layer, timestep bucket); all sums over observed calls.

    Attributes:
        modes: mode name -> that mode's summed statistics (tensors by name; see each mode's ``zero_stats``).
        calls: observed calls (batch entries).
        tokens: {"target", "context", "text"} token counts summed over calls (for the cost model).
        blocks: the same for block counts.
        heads, head_dim: of the layer.
    """

    modes: Dict[str, Dict[str, torch.Tensor]]
    calls: int = 0
    tokens: Dict[str, int] = field(default_factory=lambda: {"target": 0, "context": 0, "text": 0})
    blocks: Dict[str, int] = field(default_factory=lambda: {"target": 0, "context": 0, "text": 0})
    heads: int = 0
    head_dim: int = 0

    @classmethod
    def zeros(cls, heads: int, head_dim: int, grid: Grid, device=None) -> "LayerErrorStats":
        return cls(modes={n: get_mode(n).zero_stats(heads, g, device) for n, g in grid.modes.items()}, heads=heads,
                   head_dim=head_dim)

    def to(self, device) -> "LayerErrorStats":
        return LayerErrorStats(modes={n: {k: t.to(device) for k, t in s.items()} for n, s in self.modes.items()},
                               calls=self.calls, tokens=dict(self.tokens), blocks=dict(self.blocks), heads=self.heads,
                               head_dim=self.head_dim)

    def add_(self, other: "LayerErrorStats") -> "LayerErrorStats":
        if set(other.modes) != set(self.modes) or any(
                other.modes[n][k].shape != t.shape for n, s in self.modes.items() for k, t in s.items()):
            raise ValueError("cannot merge statistics of different heads, modes or grids")
        for n, s in self.modes.items():
            for k, t in s.items():
                t.add_(other.modes[n][k].to(t.device))
        self.calls += other.calls
        for k in self.tokens:
            self.tokens[k] += other.tokens[k]
            self.blocks[k] += other.blocks[k]
        return self

    def copy(self) -> "LayerErrorStats":
        """An independent copy (same device)."""
        return LayerErrorStats(modes={n: {k: t.clone() for k, t in s.items()} for n, s in self.modes.items()},
                               calls=self.calls, tokens=dict(self.tokens), blocks=dict(self.blocks), heads=self.heads,
                               head_dim=self.head_dim)

    @property
    def measured(self) -> bool:
        """True when some query output was measured (a reference norm > 0 in some mode)."""
        return any(bool((t > 0).any()) for s in self.modes.values() for k, t in s.items() if k.endswith("den"))

    def mean_tokens(self) -> Dict[str, float]:
        c = max(self.calls, 1)
        return {k: v / c for k, v in self.tokens.items()}

    def mean_blocks(self) -> Dict[str, float]:
        c = max(self.calls, 1)
        return {k: v / c for k, v in self.blocks.items()}

    def state(self) -> Dict[str, Any]:
        """Plain tensors and Python values (``torch.save``-able with ``weights_only=True``)."""
        s = self.to("cpu")
        return {"modes": s.modes, "calls": s.calls, "tokens": dict(s.tokens), "blocks": dict(s.blocks), "heads": s.heads,
                "head_dim": s.head_dim}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "LayerErrorStats":
        return cls(modes={n: dict(s) for n, s in d["modes"].items()}, calls=d["calls"], tokens=dict(d["tokens"]),
                   blocks=dict(d["blocks"]), heads=d["heads"], head_dim=d["head_dim"])


class CalibrationStats:
    """Statistics of every observed (layer, timestep bucket), plus what they were measured on.

    Args:
        grid: the modes and candidates to measure (default: the fixed mode's grid).
        block_size: the ISA block size the measurement assumes.
        timestep_edges: ascending timestep boundaries splitting calls into buckets (empty: one bucket).
        blocks_per_kind, tokens_per_block: query blocks sampled per kind and call, tokens per sampled block.
        seed: sampling seed; every mode samples with its own generator (seed + the mode's position among the
            registered modes), so one mode's statistics do not depend on which others are measured.

    Use :meth:`observe` per attention call (the recorder does), then :func:`fit_profile`.
    """

    def __init__(self, grid: Optional[Grid] = None, *, block_size: int = 64, timestep_edges: Sequence[float] = (),
                 blocks_per_kind: int = 48, tokens_per_block: int = 16, seed: int = 0):
        self.grid = grid or Grid()
        self.block_size = int(block_size)
        self.timestep_edges = tuple(float(e) for e in timestep_edges)
        self.blocks_per_kind = int(blocks_per_kind)
        self.tokens_per_block = int(tokens_per_block)
        order = list(registered_modes())
        for n, g in self.grid.modes.items():
            get_mode(n).check_grid(g, self.block_size)
        self.samplers = {n: Sampler(self.blocks_per_kind, self.tokens_per_block,
                                    torch.Generator().manual_seed(seed + order.index(n))) for n in self.grid.modes}
        self.layers: Dict[Tuple[str, int], LayerErrorStats] = {}
        #: the same statistics per calibration sample (``observe(..., sample=i)``): the held-out check's input
        self.per_sample: Dict[Tuple[str, int], Dict[int, LayerErrorStats]] = {}
        self.meta: Dict[str, Any] = {"timesteps": [], "calls": 0}
        self._timesteps = set()

    @property
    def num_buckets(self) -> int:
        return len(self.timestep_edges) + 1

    def bucket_of(self, timestep) -> int:
        """The timestep bucket of a call (:func:`isa_plugin.timesteps.bucket_index`; the same rule as the profile)."""
        return bucket_index(timestep, self.timestep_edges)

    def layer_names(self) -> List[str]:
        seen = []
        for name, _ in self.layers:
            if name not in seen:
                seen.append(name)
        return seen

    def get(self, layer: str, bucket: int = 0, sample: Optional[int] = None) -> Optional[LayerErrorStats]:
        """A layer's statistics (on the CPU) in a timestep bucket, over all samples or of one ``sample``."""
        s = self.layers.get((layer, bucket)) if sample is None else self.per_sample.get((layer, bucket), {}).get(sample)
        return None if s is None else s.to("cpu")

    def sample_ids(self, layer: str, bucket: int = 0) -> List[int]:
        """The samples that measured ``layer`` in ``bucket`` (empty when calls were observed without ``sample``)."""
        return sorted(self.per_sample.get((layer, bucket), {}))

    def measure_entry(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> LayerErrorStats:
        """The statistics of one batch entry (q, k, v [N, H, D]) under every mode of the grid."""
        N, H, D = q.shape
        out = LayerErrorStats(modes={}, calls=1, heads=H, head_dim=D)
        kinds = layout.blocks(self.block_size).kinds
        for name, kk in (("target", TARGET), ("context", CONTEXT), ("text", TEXT)):
            out.tokens[name] = layout.num(name)
            out.blocks[name] = int((kinds == kk).sum())
        for n, g in self.grid.modes.items():
            out.modes[n] = get_mode(n).measure(q, k, v, layout, g, block_size=self.block_size, sampler=self.samplers[n])
        return out

    def observe(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, timestep=None,
                sample: Optional[int] = None) -> None:
        """Measure one attention call (every batch entry) and add it to the layer's statistics.

        Args:
            q, k, v: [B, N, H, D] after norms and RoPE.
            layout: a :class:`Layout` or a list of one per batch entry; None skips the call.
            timestep: None, a number, or a [B] or [B, S] (per-token) tensor; the call's timestep is its largest
                value (:func:`isa_plugin.timesteps.timestep_scalar`), and every batch entry goes to its bucket.
            sample: the calibration sample the call belongs to; statistics are also kept per sample, for
                :func:`~isa_plugin.calibration.fit.fit_profile`'s held-out check.

        Raises:
            ValueError: timestep buckets are set but the call has no timestep.
        """
        if layout is None:
            logger.debug("layer %s: no layout, call not measured", layer_name)
            return
        B = q.shape[0]
        layouts = [layout] * B if isinstance(layout, Layout) else list(layout)
        t = timestep_scalar(timestep)
        bucket = self.bucket_of(t)
        if t is not None:
            self._timesteps.add(round(t, 4))
        for b in range(B):
            st = self.measure_entry(q[b], k[b], v[b], layouts[b])
            key = (layer_name, bucket)
            if sample is not None:
                per = self.per_sample.setdefault(key, {})
                if sample in per:
                    per[sample].add_(st)
                else:  # a copy: the pooled sum below may add into ``st``
                    per[sample] = st.copy()
            if key in self.layers:
                self.layers[key].add_(st)
            else:
                self.layers[key] = st
        self.meta["calls"] += B
        self.meta["timesteps"] = sorted(self._timesteps, reverse=True)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and Python values (``torch.save``-able with ``weights_only=True``)."""
        layers = {f"{name}|{b}": s.state() for (name, b), s in self.layers.items()}
        samples = {f"{name}|{b}|{i}": s.state() for (name, b), per in self.per_sample.items() for i, s in per.items()}
        return {"grid": self.grid.to_dict(), "block_size": self.block_size, "timestep_edges": list(self.timestep_edges),
                "meta": dict(self.meta), "layers": layers, "samples": samples}

    @classmethod
    def from_state_dict(cls, sd: Dict[str, Any]) -> "CalibrationStats":
        out = cls(Grid.from_dict(sd["grid"]), block_size=sd["block_size"], timestep_edges=sd["timestep_edges"])
        out.meta = dict(sd["meta"])
        for key, d in sd["layers"].items():
            name, b = key.rsplit("|", 1)
            out.layers[(name, int(b))] = LayerErrorStats.from_state(d)
        for key, d in sd.get("samples", {}).items():
            name, b, i = key.rsplit("|", 2)
            out.per_sample.setdefault((name, int(b)), {})[int(i)] = LayerErrorStats.from_state(d)
        return out
