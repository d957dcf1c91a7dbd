"""Coarse (block-pooled) attention over the whole sequence: the residual term LIVEditor is trained with.

Layout:
    q, k, v: [B, N, H, D] (diffusers' layout), any float dtype.
    blocks: the *whole* sequence cut into ``block_size``-token blocks from token 0; the last block holds
        the remaining ``N - (nb - 1) * block_size`` tokens (it may be short). Blocks ignore any span
        structure of the sequence.
    out: [B, N, H, D] in q's dtype; every token gets the row of its block.

Computation, per batch entry and head (float32 inside):

    q̄_i, k̄_i, v̄_i = mean of q, k, v over block i's true tokens
    P = softmax(q̄ k̄ᵀ · scale) over all nb blocks          (no count bias: a short block weighs as a full one)
    coarse_i = P v̄                                      [nb, D]
    out[t] = coarse_{t // block_size}

Cost: O(B·H·(N·D + nb²·D)); at N = 65,520 (nb = 1,024) and D = 128 it is a few hundred MFLOP per head,
small next to the attention it accompanies. Memory traffic dominates: one read of q, k, v (block means)
and, in :func:`gated_coarse_residual`, one read-modify-write of the attention output.

Two routes, one computation (:func:`coarse_kernels_serve` decides):

- CUDA (fp16 / bf16 / fp32, head_dim a power of two from 16 to 256, unit stride on D, block size up to
  128, no autograd): the block means come from the package's Triton pooling kernel
  (``isa_plugin::pool_blocks``, whole-sequence blocks as its starts and counts), the nb x nb softmax runs
  in torch, and ``out += gate · row`` is one in-place Triton pass (``isa_plugin::coarse_residual_add``)
  that reads each token's row by block index: nothing of size [B, N, H, D] is materialised.
- everywhere else: the same steps in PyTorch (strided block sums, a view-wise ``addcmul_``).

Both are custom ops or plain torch, so ``torch.compile`` traces either without a graph break.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch

__all__ = ["coarse_attention", "gated_coarse_residual", "residual_gate_view", "coarse_kernels_serve", "COARSE_BLOCK_SIZE"]

#: block size of LIVEditor's coarse residual (whole-sequence blocks)
COARSE_BLOCK_SIZE = 64

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def coarse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = COARSE_BLOCK_SIZE, scale: Optional[float] = None
) -> torch.Tensor:
    """Block-pooled attention over whole-sequence blocks, broadcast back to tokens.

    Args:
        q, k, v: [B, N, H, D] tensors of one shape (floating point).
        block_size: tokens per block (> 0); the last block may be shorter.
        scale: softmax scale; default ``1 / sqrt(D)``.

    Returns:
        [B, N, H, D] in ``q.dtype``: token t holds ``softmax(q̄ k̄ᵀ · scale) v̄`` of its block
        ``t // block_size`` (see the module docstring).

    Raises:
        TypeError: non-tensor or non-floating inputs.
        ValueError: inputs that are not 4-D or differ in shape, an empty sequence, or a
            ``block_size`` that is not a positive int.

    Example:
        >>> q = k = v = torch.randn(1, 150, 2, 32)
        >>> coarse_attention(q, k, v, block_size=64).shape   # blocks of 64, 64, 22 tokens
        torch.Size([1, 150, 2, 32])
    """
    _check_inputs(q, k, v, block_size)
    rows = _coarse_rows(q, k, v, block_size, scale, kernels=coarse_kernels_serve(q, k, v, block_size)).transpose(1, 2)
    B, N, H, D = q.shape
    nb = rows.shape[1]  # rows: [B, nb, H, D] float32
    out = rows.unsqueeze(2).expand(B, nb, block_size, H, D).reshape(B, nb * block_size, H, D)
    return out[:, :N].to(q.dtype)


def _check_inputs(q, k, v, block_size) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be [B, N, H, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive int (LIVEditor uses 64)")
    if q.shape[1] == 0:
        raise ValueError("the coarse residual needs at least one token (N=0)")


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, N, H, D] -> [B, H, nb, D] float32 means over whole-sequence blocks (the last may be short).

    Sums in float32 without a float32 copy of ``x`` (one read of x)."""
    B, N, H, D = x.shape
    full = N // block_size
    parts = []
    if full:
        parts.append(x[:, : full * block_size].reshape(B, full, block_size, H, D).sum(2, dtype=torch.float32) / block_size)
    if N % block_size:
        parts.append(x[:, full * block_size :].sum(1, keepdim=True, dtype=torch.float32) / (N - full * block_size))
    return torch.cat(parts, 1).transpose(1, 2) if len(parts) > 1 else parts[0].transpose(1, 2)


def coarse_kernels_serve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                         out: Optional[torch.Tensor] = None) -> bool:
    """Whether the coarse residual of these inputs runs through the Triton kernels (else PyTorch).

    The one eligibility rule of both routes (see the module docstring): CUDA tensors of one supported
    dtype each, head_dim a power of two from 16 to 256, a unit stride on D, ``block_size`` <= 128, and no
    autograd (the kernels have no backward).

    Args:
        q, k, v: [B, N, H, D] inputs (already validated); out: the attention output to add into, if any.
        block_size: the residual's block size.

    Returns:
        True when the kernels serve the call.

    Example:
        >>> coarse_kernels_serve(*[torch.zeros(1, 64, 2, 64)] * 3, 64)   # CPU tensors
        False
    """
    xs = (q, k, v) if out is None else (q, k, v, out)
    D = q.shape[-1]
    if not _HAS_TRITON or not all(x.is_cuda and x.dtype in _KERNEL_DTYPES and x.stride(-1) == 1 for x in xs):
        return False
    if D & (D - 1) or not 16 <= D <= 256 or block_size > 128:
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


def _whole_sequence_blocks(N: int, block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Starts and true counts ([nb] int32) of the whole-sequence blocks, for the pooling kernel."""
    starts = torch.arange(0, N, block_size, device=device, dtype=torch.int32)
    return starts, (N - starts).clamp_(max=block_size)


def _coarse_rows(q, k, v, block_size: int, scale: Optional[float], *, kernels: bool = False) -> torch.Tensor:
    """The nb block rows ``softmax(q̄ k̄ᵀ · scale) v̄``: [B, H, nb, D] float32 contiguous.

    ``kernels``: block means through the Triton pooling op (see :func:`coarse_kernels_serve`)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kernels:
        from .ops import pool_blocks_op

        starts, counts = _whole_sequence_blocks(q.shape[1], block_size, q.device)
        qm, km, vm = (pool_blocks_op(x, starts, counts, block_size) for x in (q, k, v))
    else:
        qm, km, vm = _block_means(q, block_size), _block_means(k, block_size), _block_means(v, block_size)
    probs = torch.softmax(torch.matmul(qm, km.transpose(-1, -2)) * scale, dim=-1)  # [B, H, nb, nb]
    return torch.matmul(probs, vm)


def _add_residual_kernels(out, q, k, v, gate, block_size: int, scale: Optional[float]) -> torch.Tensor:
    """The kernel route of :func:`gated_coarse_residual`: ``out += gate · coarse`` in place, returns ``out``.

    ``out``: [B, N, H, D] with a unit stride on D (owned by the caller); ``gate``: B * N scalars."""
    from .ops import coarse_residual_add_op

    B, N = q.shape[:2]
    rows = _coarse_rows(q, k, v, block_size, scale, kernels=True)  # [B, H, nb, D] float32
    coarse_residual_add_op(out, rows, gate.reshape(B, N).float().contiguous(), block_size)
    return out


def residual_gate_view(gate: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """Check a per-token residual gate and view it as [B, N, 1, 1] (broadcast over heads and channels).

    Args:
        gate: [B, N] or [B, N, 1] floating tensor.
        batch, tokens: the B and N of the attention call.

    Returns:
        ``gate`` viewed as [B, N, 1, 1].

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: any other shape.

    Example:
        >>> residual_gate_view(torch.zeros(2, 100), 2, 100).shape
        torch.Size([2, 100, 1, 1])
    """
    if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
        raise TypeError(f"residual_gate must be a floating-point tensor, got {gate.dtype if isinstance(gate, torch.Tensor) else type(gate).__name__}")
    if tuple(gate.shape) not in ((batch, tokens), (batch, tokens, 1)):
        raise ValueError(
            f"residual_gate has shape {tuple(gate.shape)}; expected [B, N] = [{batch}, {tokens}] or [B, N, 1] (one scalar per token)"
        )
    return gate.reshape(batch, tokens, 1, 1)


def gated_coarse_residual(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    block_size: int = COARSE_BLOCK_SIZE,
    scale: Optional[float] = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``out + gate · coarse_attention(q, k, v)``: an attention output plus LIVEditor's gated residual.

    The block rows are broadcast into ``out`` by one fused multiply-add per token, without
    materialising the [B, N, H, D] coarse tensor: the extra work is one read of q, k, v (block means),
    an nb x nb attention per head, and one read-modify-write of ``out``. On CUDA the pooling and the
    multiply-add are Triton kernels (:func:`coarse_kernels_serve`; the add runs in float32 and rounds once).

    Args:
        out: [B, N, H, D] attention output (dense or ISA).
        q, k, v: [B, N, H, D], the inputs of that attention.
        gate: [B, N] or [B, N, 1], one scalar per token (shared by heads and channels).
        block_size, scale: as :func:`coarse_attention`.
        inplace: add into ``out`` itself (callers that own ``out``); default: a new tensor.

    Returns:
        [B, N, H, D] in ``out.dtype`` (contiguous).

    Raises:
        TypeError, ValueError: as :func:`coarse_attention` and :func:`residual_gate_view`; ``out`` not of
            q's shape.

    Example:
        >>> o = gated_coarse_residual(dense, q, k, v, gate)     # gate: [B, N, 1]
    """
    _check_inputs(q, k, v, block_size)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape:
        raise ValueError(f"out must be a tensor of q's shape {tuple(q.shape)}, got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    B, N, H, D = q.shape
    g = residual_gate_view(gate, B, N)
    if not inplace or not out.is_contiguous() or out.requires_grad:
        out = out.contiguous().clone() if out.is_contiguous() else out.contiguous()
    if coarse_kernels_serve(q, k, v, block_size, out):
        return _add_residual_kernels(out, q, k, v, g, block_size, scale)
    g = g.to(out.dtype)
    rows = _coarse_rows(q, k, v, block_size, scale).transpose(1, 2).to(out.dtype)  # [B, nb, H, D]
    full = N // block_size
    if full:
        m = full * block_size
        out[:, :m].view(B, full, block_size, H, D).addcmul_(g[:, :m].reshape(B, full, block_size, 1, 1), rows[:, :full, None])
    if N % block_size:
        out[:, full * block_size :].addcmul_(g[:, full * block_size :], rows[:, full:])
    return out
