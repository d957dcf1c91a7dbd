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
#: the compact planner implements ISAConfig.share_plan (one plan from the batch-mean block means)
SUPPORTS_SHARE_PLAN = True


def triton_ineligible(q: torch.Tensor, config) -> Optional[str]:
    """Why the Triton kernels cannot serve a call with these inputs (None when they can)."""
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


def isa_attention_triton(q, k, v, layout, config, scale=None):
    """ISA attention through the Triton kernels (see :func:`triton_ineligible` for what is served).

    Args:
        q, k, v: [B, N, H, D] CUDA tensors of one dtype; k and v need a unit stride on D.
        layout: :class:`~isa_plugin.Layout` covering N; config: :class:`~isa_plugin.ISAConfig`.
        scale: softmax scale (default 1/sqrt(D)).
    Returns:
        [B, N, H, D] in q's dtype.
    """
    from .ops import isa_attention_kernels

    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    backend = "triton" if q.dtype == torch.float32 else "auto"
    return isa_attention_kernels(q, k, v, layout, config, scale=scale, exact_backend=backend)
