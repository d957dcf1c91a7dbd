"""Fidelity metrics: PSNR and SSIM between two videos (averaged over frames), and the relative L1 error of an
attention output by query kind.

Videos are float tensors or arrays of shape [F, H, W, C] with values in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "to_video_tensor", "l1_sums_by_kind"]


def l1_sums_by_kind(out: torch.Tensor, ref: torch.Tensor, layout) -> dict:
    """Sums of ``|out − ref|`` and ``|ref|`` over the target-query and the context-query rows of an attention call.

    Args:
        out, ref: [B, N, H, D] outputs (an approximation and dense attention).
        layout: the call's :class:`~isa_plugin.Layout` (covering N).

    Returns:
        ``{"target": (error sum, reference sum), "context": (…)}`` as floats; a kind without tokens has
        ``(0.0, 0.0)``. Their ratio is the relative L1 error that budgets and profiles use.
    """
    out, ref = out.float(), ref.float()
    sums = {}
    for kind in ("target", "context"):
        rows = torch.cat([torch.full((n,), k == kind, dtype=torch.bool) for k, n in layout.spans]).to(out.device)
        if rows.any():
            sums[kind] = (float((out[:, rows] - ref[:, rows]).abs().sum()), float(ref[:, rows].abs().sum()))
        else:
            sums[kind] = (0.0, 0.0)
    return sums


def to_video_tensor(video) -> torch.Tensor:
    """[F, H, W, C] float64 in [0, 1] from a tensor/array (uint8 or float) or a list of PIL images/arrays."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f) for f in video])
    t = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if t.ndim == 3:
        t = t[..., None]
    if t.ndim != 4:
        raise ValueError(f"a video must be [frames, height, width, channels]; got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        return t.double() / 255.0
    return t.double().clamp(0, 1)


def _pair(a, b):
    a, b = to_video_tensor(a), to_video_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (peak 1.0), mean over frames; ``inf`` for identical videos."""
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    vals = [math.inf if m == 0 else 10 * math.log10(1.0 / float(m)) for m in mse]
    finite = [v for v in vals if math.isfinite(v)]
    return math.inf if not finite else float(np.mean([min(v, 100.0) for v in vals]))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b) -> float:
    """Structural similarity (Gaussian window 11, σ 1.5, on luma-agnostic channels), mean over frames.

    The window shrinks to the frame size for frames smaller than 11 pixels.
    """
    a, b = _pair(a, b)
    x = a.permute(0, 3, 1, 2)  # [F, C, H, W]
    y = b.permute(0, 3, 1, 2)
    size = min(11, x.shape[-1], x.shape[-2])
    g = _gaussian(size)
    C = x.shape[1]
    w_h = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    w_w = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, w_h, groups=C), w_w, groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())
