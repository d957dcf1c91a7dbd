"""The count rule: one function for numbers and tensors, robust to round-off."""

import math

import torch

from isa_plugin.kernels.counts import keep_count, topk_count


def test_numbers():
    assert keep_count(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in binary
    assert keep_count(0.125, 20) == 3
    assert keep_count(0.01, 5) == 1  # at least one of a non-empty set
    assert keep_count(1.0, 7) == 7 and keep_count(0.999, 7) == 7
    assert keep_count(0.5, 0) == 0 and keep_count(0.5, -3) == 0
    assert isinstance(keep_count(0.5, 4), int)


def test_tensor_matches_numbers_elementwise():
    g = torch.Generator().manual_seed(0)
    alpha = torch.cat([torch.rand(200, generator=g, dtype=torch.float64).clamp(min=1e-3),
                       torch.tensor([0.1, 0.2, 0.3, 0.7, 1.0, 1 / 3], dtype=torch.float64)])
    n = torch.randint(0, 50, alpha.shape, generator=g)
    got = keep_count(alpha, n)
    assert got.dtype == torch.int64 and got.shape == alpha.shape
    assert got.tolist() == [keep_count(float(a), int(m)) for a, m in zip(alpha, n)]
    # broadcasting: per-head ratios [1, H] against per-entry counts [B, 1]
    per = keep_count(alpha[None, :4], torch.tensor([[3], [0]]))
    assert per.shape == (2, 4) and per[1].eq(0).all()
    # a plain int count with tensor ratios
    assert keep_count(alpha[:5], 30).tolist() == [keep_count(float(a), 30) for a in alpha[:5]]


def test_topk_count():
    assert topk_count(0.0625, 40) == 2 and topk_count(0.0625, 3) == 1 and topk_count(0.5, 0) == 1
    assert topk_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in binary
    assert all(topk_count(f, n) == max(1, math.floor(round(f * n, 9))) for f in (0.0625, 0.25, 0.5) for n in range(0, 70))
