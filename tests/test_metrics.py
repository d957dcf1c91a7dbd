import math

import numpy as np
import pytest
import torch

from isa_plugin.metrics import psnr, ssim


def test_identical_and_noisy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 40, 3, generator=g)
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    worse = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 20 < psnr(a, noisy) < 30 and psnr(a, worse) < psnr(a, noisy)
    assert ssim(a, worse) < ssim(a, noisy) < 1.0
    # known value: constant offset 0.1 -> MSE 0.01 -> 20 dB
    assert psnr(torch.full((1, 8, 8, 1), 0.5), torch.full((1, 8, 8, 1), 0.6)) == pytest.approx(20.0)


def test_uint8_and_shape_errors():
    a = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    b = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:1])
