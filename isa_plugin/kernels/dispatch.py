"""Routing of ISA calls to the Triton kernels (filled in by the kernel modules)."""

from __future__ import annotations

from typing import Optional

import torch


def triton_ineligible(q: torch.Tensor, config) -> Optional[str]:
    """Why the Triton kernels cannot serve a call with these inputs (None when they can)."""
    if not q.is_cuda:
        return f"inputs are on {q.device.type}, the kernels need CUDA"
    return "the Triton kernels are not built into this version"


def isa_attention_triton(q, k, v, layout, config, scale=None):  # pragma: no cover - replaced by kernels
    raise RuntimeError("the Triton kernels are not built into this version")
