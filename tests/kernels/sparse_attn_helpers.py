"""Shared by the tests of the block-sparse plan executor (interpreter and GPU) and its benchmark:
random plans, inputs, and the reference on the same plan with FlashAttention's tolerance rule.

The reference is :func:`~isa_plugin.kernels.reference.execute_plan_reference` on the same
:class:`~isa_plugin.plan.BlockPlan`.
"""

from __future__ import annotations

from typing import Optional

import torch

from isa_plugin.kernels.testing import check_close, plan_rows
from isa_plugin.kernels.reference import execute_plan_reference
from isa_plugin.plan import BlockPlan

__all__ = ["LAYOUTS", "qkv", "random_plan", "sparsity_plan", "reference_out"]

LAYOUTS = [
    [("target", 150), ("context", 130)],
    [("text", 20), ("target", 100), ("context", 1), ("context", 70), ("target", 65)],
    [("context", 64), ("target", 1), ("target", 127), ("text", 33)],
    [("target", 300), ("context", 129), ("text", 7)],
]


def qkv(rng, B, N, H, D, dtype, device="cpu"):
    """Three [B, N, H, D] standard-normal tensors (generated on the CPU generator ``rng`` when device is cpu)."""
    if device == "cpu":
        return [torch.randn(B, N, H, D, generator=rng).to(dtype) for _ in range(3)]
    return [torch.randn(B, N, H, D, generator=rng, device=device, dtype=dtype) for _ in range(3)]


def random_plan(blocks, B, H, rng, p_keep: float = 0.7, device="cpu") -> BlockPlan:
    """A plan with random kept blocks (at least one per head) and a random kind per row: empty (only
    pseudo-keys), full (every kept block exact) or a random subset of KV' of random density."""
    nb = blocks.num_blocks
    gdev = rng.device
    keep = torch.rand(B, H, nb, generator=rng, device=gdev) < p_keep
    first = torch.randint(0, nb, (B, H), generator=rng, device=gdev)
    keep.scatter_(-1, first[..., None], True)
    kind = torch.randint(0, 3, (B, H, nb, 1), generator=rng, device=gdev)
    dens = torch.rand(B, H, nb, 1, generator=rng, device=gdev)
    rnd = torch.rand(B, H, nb, nb, generator=rng, device=gdev) < dens
    row_keep = keep[:, :, None, :]
    exact = torch.where(kind == 0, torch.zeros_like(rnd), torch.where(kind == 1, row_keep.expand_as(rnd), rnd & row_keep))
    dev = torch.device(device)
    return BlockPlan.from_masks(blocks.to(dev), keep.to(dev), exact.to(dev), pseudo_block=blocks.block_size)


def sparsity_plan(blocks, B, H, sparsity: float, seed: int = 0, device="cuda") -> BlockPlan:
    """Every key block kept, every row with exactly round((1 - sparsity) * nb) random exact blocks
    (at least one): the benchmark's plans."""
    nb = blocks.num_blocks
    n_exact = max(1, int(round((1.0 - sparsity) * nb)))
    g = torch.Generator(device=device).manual_seed(seed)
    keep = torch.ones(B, H, nb, dtype=torch.bool, device=device)
    exact = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device)
    for b in range(B):
        for h in range(H):
            idx = torch.rand(nb, nb, generator=g, device=device).argsort(-1)[:, :n_exact]
            exact[b, h].scatter_(-1, idx, True)
    return BlockPlan.from_masks(blocks.to(device), keep, exact, pseudo_block=blocks.block_size)


def reference_out(out, q, k, v, plan: BlockPlan, scale: Optional[float] = None, rows: Optional[torch.Tensor] = None):
    """Compare ``out`` [B, N, H, D] with the reference on the same plan.

    Without ``rows`` (small problems): the whole reference in float64 against PyTorch in the input
    dtype (fp16/bf16: :func:`~isa_plugin.kernels.testing.plan_rows` with ``lowp``; fp32: the reference in float32). With
    ``rows`` [R] (large problems): those query rows only, reference in float32.
    """
    if rows is None:
        ref = execute_plan_reference(q.double(), k.double(), v.double(), plan, scale)
        if q.dtype == torch.float32:
            base = execute_plan_reference(q, k, v, plan, scale)
            atol = 1e-5
        else:
            base = plan_rows(q, k, v, plan, torch.arange(q.shape[1], device=q.device), scale, lowp=True)
            atol = 2e-4
        return check_close(out, ref, base, atol=atol)
    ref = plan_rows(q, k, v, plan, rows, scale)
    base = plan_rows(q, k, v, plan, rows, scale, lowp=True)
    return check_close(out[:, rows], ref, base, atol=1e-3 if q.dtype != torch.float32 else 1e-5)


def check_fused_adaptive_plan(layout, B, H, settings, device, block_size=64, D=32):
    """``AdaptiveMode.plan_fused`` on ``device`` against the torch planner on the CPU, from the same block means:
    KV', exact masks, k*, covered mass and the CSR lists (ascending ids at the row offsets, -1 after). A row may
    differ only where a prefix sum lands within float rounding (1e-5) of its threshold, and at most 2% of rows."""
    from isa_plugin.selection import get_mode

    mode = get_mode("adaptive")
    blocks = layout.blocks(block_size)
    nb = blocks.num_blocks
    g = torch.Generator().manual_seed(nb)
    qbar = torch.randn(B, H, nb, D, generator=g)
    kbar = torch.randn(B, H, nb, D, generator=g) * 0.7
    st = mode.settings(block_size, **settings)
    scale = D ** -0.5
    ref = mode.plan(qbar, kbar, blocks, st, scale)
    got = mode.plan_fused(qbar.to(device), kbar.to(device), blocks, st, scale)
    got_mask = got.exact_mask().cpu()
    assert torch.equal(ref.kv_keep, got.kv_keep.cpu())
    same = (ref.exact_mask() == got_mask).all(-1)  # [B, H, nb]
    if not bool(same.all()):
        ph = mode.per_head(st, H)
        o = mode.order(qbar, kbar, blocks, ph["alpha_s"], scale)
        p = mode._thresholds(blocks, ph)[None, :, :, None].expand_as(o.reached)
        gap = (o.reached - p).abs().min(-1).values
        assert bool((gap[~same] < 1e-5).all()) and (~same).float().mean() < 0.02, gap[~same]
    assert torch.equal(ref.diagnostics["n_exact"][same], got.diagnostics["n_exact"].cpu()[same])
    torch.testing.assert_close(got.diagnostics["covered"].cpu()[same], ref.diagnostics["covered"][same].float(), atol=1e-5, rtol=1e-5)
    row_ptr, col_idx = got.row_ptr.cpu(), got.col_idx.cpu()
    assert torch.equal(row_ptr[..., 1:] - row_ptr[..., :-1], got_mask.sum(-1))
    rebuilt = BlockPlan.from_masks(blocks, got.kv_keep.cpu(), got_mask, got.pseudo_block)
    n = rebuilt.col_idx.shape[-1]
    assert torch.equal(rebuilt.row_ptr, row_ptr) and torch.equal(rebuilt.col_idx, col_idx[..., :n])
    assert bool((col_idx[..., n:] == -1).all())


def stale_plan_outputs(name, layout, cfg, first, second, scale):
    """Executor ``name``'s plan made on ``first`` = (q, k) executed on ``second`` = (q, k, v), and the reference
    executing the reference plan of ``first`` on ``second`` (float64): what plan reuse across steps must match.
    Also the reference's fresh plan of ``second``, to show the stale plan differs. Returns (got, stale_ref, fresh_ref)."""
    from isa_plugin.execution import get_executor
    from isa_plugin.executors.reference import plan_reference

    (q1, k1), (q2, k2, v2) = first, second
    ex = get_executor(name)
    got = ex.execute(q2, k2, v2, layout, cfg, scale, ex.plan(q1, k1, None, layout, cfg, scale))
    d = [t.double() for t in (q1, k1, q2, k2, v2)]
    stale = execute_plan_reference(d[2], d[3], d[4], plan_reference(d[0], d[1], layout, cfg, scale), scale)
    fresh = execute_plan_reference(d[2], d[3], d[4], plan_reference(d[2], d[3], layout, cfg, scale), scale)
    return got.double(), stale, fresh
