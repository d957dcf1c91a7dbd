"""Routing of ISA calls to the Triton kernels.

The kernels serve CUDA inputs of dtype fp16, bf16 or fp32 with head_dim 64 or 128 and block sizes
16, 32, 64 or 128, on GPUs of compute capability 8.0 or newer (Ampere, Ada, Hopper). fp16/bf16 calls
run the exact group through cuDNN attention on gathered tensors and the Taylor group in Triton; fp32
calls stay in fp32 (Triton for both groups, full-precision dots: slower, but no silent down-cast).
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_ineligible(q: torch.Tensor, config) -> Optional[str]:
    """Why the Triton kernels cannot serve a call with these inputs (None when they can).

    Args:
        q: [B, N, H, D] query tensor (device, dtype, head_dim and strides are checked).
        config: :class:`~isa_plugin.ISAConfig` (its block size is checked).

    Returns:
        A sentence naming the unsupported value and what is supported, or None. Callers that get None
        run :func:`isa_plugin.kernels.ops.isa_attention_kernels`.

    Example:
        >>> triton_ineligible(torch.zeros(1, 128, 2, 64), ISAConfig())  # doctest: +SKIP
        'inputs are on cpu, the kernels need CUDA'
    """
    if not q.is_cuda:
        return f"inputs are on {q.device.type}, the kernels need CUDA"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported; supported: float16, bfloat16, float32"
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={D} is not supported; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
    if config.block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size={config.block_size} is not supported by the kernels; supported: {SUPPORTED_BLOCK_SIZES}"
    if q.stride(-1) != 1:
        return "q needs a unit stride on the head dimension"
    major, _ = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"compute capability {major}.x is too old; the kernels need 8.0 or newer (Ampere, Ada, Hopper)"
    try:
        import triton  # noqa: F401  (availability check)
    except Exception as e:  # pragma: no cover - environment
        return f"triton is not importable ({e})"
    return None
