"""Device names a user types (``"cuda"``, ``"cuda:1"``, ``"cpu"``): one check for the demo and the CLI."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["resolve_device"]


def resolve_device(device: Optional[str], *, name: str = "device") -> torch.device:
    """Turn a device name into a ``torch.device`` this machine has, or say what to type instead.

    Args:
        device: ``"cuda"``, ``"cuda:N"``, ``"cpu"`` (any name torch knows), or None for CUDA when a GPU is
            visible, else the CPU.
        name: how the value is named in messages (the CLI passes ``"--device"``).

    Returns:
        the ``torch.device``.

    Raises:
        ValueError: a name torch does not know (e.g. ``"gpu"``), a CUDA device on a machine without a
            visible CUDA GPU, or a GPU index the machine does not have; the message names the fix.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ValueError: device='gpu' is not a device name; use 'cuda' (or 'cuda:N') for an NVIDIA GPU, or 'cpu'
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}={device!r} is not a device name; use 'cuda' (or 'cuda:N') for an NVIDIA GPU, or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: no CUDA GPU is visible on this machine "
                             f"(torch {torch.__version__} reports none); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use an index below {torch.cuda.device_count()}")
    return dev
