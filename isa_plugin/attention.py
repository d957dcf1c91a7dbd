"""Public functional entry point: :func:`isa_attention` (plan, then execute; dense fallback)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .config import ISAConfig
from . import executors  # noqa: F401  (registers the package's executors)
from .dispatch import choose_executor
from .execution import get_executor
from .kernels.coarse import COARSE_BLOCK_SIZE, gated_coarse_residual, residual_gate_view
from .layout import Layout
from .plan_reuse import PlanStore

__all__ = ["isa_attention", "ISAInfo", "dense_attention", "select_backend", "run_isa", "run_route", "Route"]

logger = logging.getLogger(__name__)

LayoutArg = Union[Layout, Sequence[Layout]]


@dataclass(frozen=True)
class ISAInfo:
    """How one :func:`isa_attention` call was served.

    Attributes:
        used_isa: False when the call fell back to dense attention.
        backend: the executor that ran (``"reference"``, ``"triton"``: ISA's Triton kernels, ``"flex"``:
            FlexAttention; :mod:`isa_plugin.executors`) or ``"dense"``.
        reason: why the call fell back to dense attention (None when ISA ran).
    """

    used_isa: bool
    backend: str
    reason: Optional[str] = None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Dense softmax attention through torch SDPA, q/k/v/out in [B, N, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _check_inputs(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [B, N, H, D] (diffusers' layout)")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share one [B, N, H, D] shape "
            "(ISA serves self-attention; use dense attention for cross-attention)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not q.is_floating_point():
        raise TypeError(f"q has dtype {q.dtype}; ISA needs floating-point inputs")


#: dtypes ISA serves inside a model (other dtypes run the model's dense attention)
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: largest head_dim ISA serves inside a model (head_dim must also be a multiple of 8 there)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Route:
    """The one backend decision of an ISA call (made by :func:`select_backend`).

    Attributes:
        backend: the executor to run (:mod:`isa_plugin.executors`: ``"reference"``, ``"triton"``,
            ``"flex"``) or ``"dense"``.
        reason: for ``"dense"``, why ISA cannot serve the call; for ``"reference"``, why no GPU executor
            can (None when the config asked for the reference); None otherwise.
    """

    backend: str
    reason: Optional[str] = None


def select_backend(q: torch.Tensor, layout: Layout, config: ISAConfig, *, in_model: bool = False) -> Route:
    """Decide once how an eligible-shaped ISA call is served: the kernels, the reference, or dense.

    Args:
        q: [B, N, H, D] queries (only device, dtype, shape and strides are read).
        layout: the call's layout (covering N tokens).
        config: the call's :class:`ISAConfig`.
        in_model: the call comes from an ISA processor inside a model. There, calls the kernels cannot
            serve off the CPU run the model's dense attention (the reference at video lengths on an
            accelerator would be far slower than dense attention), ``backend="triton"`` never raises, and
            dtypes / head sizes outside :data:`MODEL_DTYPES` / multiples of 8 up to :data:`MAX_HEAD_DIM`
            run dense. Outside a model (:func:`isa_attention`), such calls run the reference.

    Returns:
        a :class:`Route`.

    Raises:
        RuntimeError: ``config.backend == "triton"`` outside a model and the kernels cannot serve the call.
    """
    if in_model:
        if q.dtype not in MODEL_DTYPES:
            return Route("dense", f"dtype {q.dtype} not supported")
        D = q.shape[-1]
        if D % 8 != 0 or D > MAX_HEAD_DIM:
            return Route("dense", f"head_dim={D} not supported (multiples of 8 up to {MAX_HEAD_DIM})")
    if layout.num_blocks(config.block_size) < 2:
        return Route("dense", f"sequence too short: fewer than two blocks ({layout.num_tokens} tokens, block_size={config.block_size})")
    if config.backend == "reference":
        return Route("reference")
    # a named executor, or (auto) the mode's executors ranked by the device's cost model (isa_plugin.dispatch)
    names = config.selection.executors if config.backend == "auto" else (config.backend,)
    name, why_not = choose_executor(q, layout, config, names)
    if name is not None:
        return Route(name)
    if config.backend != "auto" and not in_model:
        raise RuntimeError(f"ISAConfig.backend={config.backend!r} but that executor cannot serve this call: {why_not}")
    if in_model and (config.backend != "auto" or q.device.type != "cpu"):
        return Route("dense", f"ISA kernels unavailable: {why_not}")
    return Route("reference", why_not)


def run_isa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, config: ISAConfig, route: Route,
            scale: Optional[float] = None, *, plans: Optional[PlanStore] = None, timestep: Optional[float] = None) -> torch.Tensor:
    """Execute an ISA call on the executor ``route`` chose; [B, N, H, D] in, out.

    Callers validate inputs and decide the route first (:func:`isa_attention` does both).

    Args:
        plans: the calling layer's :class:`~isa_plugin.plan_reuse.PlanStore`; with ``config.plan_reuse > 1``
            (and eager execution) a plan made at an earlier step is executed when the store holds one for
            this call (:mod:`isa_plugin.plan_reuse`), else the call plans and the store keeps the plan.
        timestep: the call's timestep scalar (steps of the reuse count), None when it has none.

    Raises:
        ValueError: a ``"dense"`` route (not an executor).
    """
    if route.backend == "dense":
        raise ValueError("run_isa runs an executor's route; a 'dense' route runs dense_attention")
    if q.is_cuda and route.backend == "reference" and route.reason is not None:
        logger.debug("ISA kernels unavailable (%s); using the PyTorch reference", route.reason)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    executor = get_executor(route.backend)
    if plans is None or config.plan_reuse == 1 or torch.compiler.is_compiling():
        return executor.run(q, k, v, layout, config, sc)
    key = (route.backend, tuple(q.shape), q.dtype, q.device, layout, config, sc)
    plan, branch = plans.lookup(timestep, key, config.plan_reuse)
    if plan is None:
        plan = executor.plan(q, k, v, layout, config, sc)
        plans.keep(branch, key, plan)
    return executor.execute(q, k, v, layout, config, sc, plan)


def run_route(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    config: ISAConfig,
    route: Route,
    *,
    dense: Optional[Callable[[], torch.Tensor]] = None,
    scale: Optional[float] = None,
    residual_gate: Optional[torch.Tensor] = None,
    residual_block_size: Optional[int] = None,
    plans: Optional[PlanStore] = None,
    timestep: Optional[float] = None,
) -> torch.Tensor:
    """Serve one attention call on the route :func:`select_backend` chose, then add the gated coarse residual.

    The one execution path of :func:`isa_attention` and of the ISA processors: ISA through :func:`run_isa`,
    or dense attention on the ``"dense"`` route; with ``residual_gate``, ``gate · coarse(q, k, v)`` is added
    to the output of either.

    Args:
        q, k, v: [B, N, H, D], one shape and dtype (callers validate them).
        layout: the call's :class:`Layout` (covering N tokens; unused on the ``"dense"`` route).
        config: the call's :class:`ISAConfig` (unused on the ``"dense"`` route).
        route: the call's :class:`Route`.
        dense: zero-argument callable returning the dense output [B, N, H, D] on the ``"dense"`` route (an ISA
            processor passes the model's own attention call); default :func:`dense_attention` (torch SDPA).
        scale: softmax scale of ISA, of the default dense path and of the residual; default 1/sqrt(D).
        residual_gate: [B, N] or [B, N, 1] per-token gate of a coarse attention residual (as in
            :func:`isa_attention`), or None (stock models): nothing is added.
        residual_block_size: block size of that residual; default 64 (LIVEditor's).
        plans, timestep: plan reuse across steps, as in :func:`run_isa`.

    Returns:
        [B, N, H, D].

    Raises:
        ValueError: a ``residual_gate`` whose shape is not [B, N] or [B, N, 1]; a route :func:`run_isa`
            does not serve.

    Example:
        >>> route = select_backend(q, layout, config, in_model=True)
        >>> out = run_route(q, k, v, layout, config, route, dense=model_attention, residual_gate=gate)
    """
    if route.backend == "dense":
        out = dense() if dense is not None else dense_attention(q, k, v, scale)
    else:
        out = run_isa(q, k, v, layout, config, route, scale, plans=plans, timestep=timestep)
    if residual_gate is not None:
        block_size = COARSE_BLOCK_SIZE if residual_block_size is None else residual_block_size
        out = gated_coarse_residual(out, q, k, v, residual_gate, block_size, scale, inplace=True)
    return out


def _normalise_layout(layout, batch: int) -> Union[Layout, List[Layout]]:
    """The one place a layout argument is accepted: a Layout, ``(kind, length)`` pairs, or one of those per entry.

    Returns:
        a :class:`Layout`, or a list of ``batch`` Layouts.

    Raises:
        TypeError / ValueError: anything else, with what to write instead.
    """
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, (str, bytes)) or not isinstance(layout, Sequence):
        raise TypeError(f"layout must be a Layout, a list of (kind, length) pairs such as [('target', 1024), ('context', 1024)], "
                        f"or one of those per batch entry; got {type(layout).__name__}")
    items = list(layout)
    if items and all(isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return Layout(items)  # plain (kind, length) pairs
    if len(items) == batch and all(isinstance(x, Layout) or isinstance(x, (tuple, list)) for x in items):
        return [x if isinstance(x, Layout) else Layout(x) for x in items]
    raise ValueError(f"layout must be a Layout, a list of (kind, length) pairs such as [('target', 1024), ('context', 1024)], "
                     f"or a list of {batch} of those (one per batch entry); got {layout!r}")


def isa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: LayoutArg,
    config: Optional[ISAConfig] = None,
    *,
    scale: Optional[float] = None,
    return_info: bool = False,
    residual_gate: Optional[torch.Tensor] = None,
    residual_block_size: int = COARSE_BLOCK_SIZE,
):
    """In-context sparse attention over target, context and text tokens.

    Args:
        q, k, v: [B, N, H, D] (sequence before heads, as diffusers' processors hold them), one dtype.
        layout: a :class:`Layout` covering the N tokens, a plain list of ``(kind, length)`` pairs (made into
            a Layout), or one of those per batch entry (each covering N).
        config: ratios, block size, sharpness metric and backend; default :class:`ISAConfig`.
        scale: softmax scale, default 1/sqrt(D).
        return_info: also return an :class:`ISAInfo` saying how the call was served.
        residual_gate: [B, N] or [B, N, 1] per-token gate of a coarse attention residual, for models
            trained with one (LIVEditor): the output becomes ``attention + gate · coarse(q, k, v)`` with
            ``coarse`` the block-pooled attention over whole-sequence ``residual_block_size`` blocks
            (:func:`~isa_plugin.kernels.coarse.coarse_attention`), on every path (ISA kernels, reference,
            dense fallback). None (default, stock models): nothing is added.
        residual_block_size: block size of that residual (64, as LIVEditor was trained).

    Returns:
        [B, N, H, D] in q's dtype (or ``(out, info)``). Each query attends over the target and text
        tokens and the kept context blocks; sharp query blocks exactly, the others through the
        0th-order Taylor branch. No row is ever empty: every query sees at least its target blocks.
        NaN/Inf in the inputs propagate as in dense attention.
        With all ratios 1 the result is dense attention. Calls that cannot use ISA (fewer than two
        blocks) are served by dense attention, reported through ``info``.

    Raises:
        ValueError: shapes that differ, a layout that does not cover N tokens (with q in the [B, H, N, D]
            layout, the message says so and how to transpose), per-head ratios whose length is not H, or a
            list of layouts whose length is not B.

    Example:
        >>> q = k = v = torch.randn(1, 512, 2, 64)
        >>> out, info = isa_attention(q, k, v, Layout([("target", 256), ("context", 256)]), return_info=True)
        >>> info.used_isa
        True
    """
    config = config or ISAConfig()
    if not isinstance(config, ISAConfig):
        raise TypeError(f"config must be an ISAConfig, got {type(config).__name__}")
    _check_inputs(q, k, v)
    B, N, H, _ = q.shape
    config.per_head(H)  # validates per-head lengths
    if residual_gate is not None:
        residual_gate_view(residual_gate, B, N)  # validates the gate's shape before any work
    layout = _normalise_layout(layout, B)
    if not isinstance(layout, Layout):
        layouts = layout
        if len(set(layouts)) == 1:
            layout = layouts[0]
        else:
            parts = [isa_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], l, config, scale=scale, return_info=True,
                                   residual_gate=None if residual_gate is None else residual_gate[i : i + 1],
                                   residual_block_size=residual_block_size) for i, l in enumerate(layouts)]
            out = torch.cat([p[0] for p in parts])
            infos = [p[1] for p in parts]
            info = next((i for i in infos if not i.used_isa), infos[0])
            return (out, info) if return_info else out
    if layout.num_tokens != N and layout.num_tokens == H and N != H:
        raise ValueError(f"{layout!r} covers {layout.num_tokens} tokens, which is q's dimension 2 (N={N} is dimension 1): "
                         f"q {tuple(q.shape)} looks like [B, H, N, D]; isa_attention takes [B, N, H, D] — "
                         "pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) (and transpose the output back)")
    layout.check(N)

    route = select_backend(q, layout, config)
    out = run_route(q, k, v, layout, config, route, scale=scale, residual_gate=residual_gate,
                    residual_block_size=residual_block_size)
    info = ISAInfo(False, "dense", route.reason) if route.backend == "dense" else ISAInfo(True, route.backend)
    return (out, info) if return_info else out
