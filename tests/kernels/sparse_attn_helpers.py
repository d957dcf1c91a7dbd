"""Shared by the tests of the block-sparse plan executor (interpreter and GPU) and its benchmark:
random plans, inputs, and the reference on the same plan with FlashAttention's tolerance rule.

The reference is :func:`~isa_plugin.kernels.reference.execute_plan_reference` on the same
:class:`~isa_plugin.plan.BlockPlan`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from isa_plugin.kernels.reference import execute_plan_reference, pool_blocks
from isa_plugin.plan import BlockPlan

__all__ = ["LAYOUTS", "qkv", "random_plan", "sparsity_plan", "plan_rows_ref", "reference_out", "check_close"]

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


def plan_rows_ref(q, k, v, plan: BlockPlan, rows: torch.Tensor, scale: Optional[float] = None, lowp: bool = False, chunk: int = 64):
    """The reference semantics at query tokens ``rows`` [R] only: [B, R, H, D] float32 (float64 for
    float64 inputs). ``lowp``: scores and P·V in the input dtype, softmax in float32 (what plain PyTorch
    gets in that dtype: the baseline of the tolerance rule)."""
    B, N, H, D = q.shape
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    wt = q.dtype if lowp else ct
    blocks = plan.blocks.to(q.device)
    tb = blocks.token_block
    kbar = pool_blocks(k, blocks).to(wt)  # [B, H, nb, D]
    vbar = pool_blocks(v, blocks).to(wt)
    log_n = torch.log(blocks.counts.to(ct))
    exact, approx = plan.exact_mask(), plan.approx_mask()
    out = torch.empty(B, rows.numel(), H, D, dtype=ct, device=q.device)
    for b in range(B):
        kh = k[b].to(wt).permute(1, 0, 2)  # [H, N, D]
        vh = v[b].to(wt).permute(1, 0, 2)
        for r0 in range(0, rows.numel(), chunk):
            rr = rows[r0 : r0 + chunk]
            qb = tb[rr]
            qc = q[b, rr].to(wt).permute(1, 0, 2)  # [H, T, D]
            s_tok = torch.matmul(qc, kh.transpose(-1, -2)).to(ct) * sc
            s_tok = s_tok.masked_fill(~exact[b][:, qb][:, :, tb], float("-inf"))
            s_bar = torch.matmul(qc, kbar[b].transpose(-1, -2)).to(ct) * sc + log_n
            s_bar = s_bar.masked_fill(~approx[b][:, qb], float("-inf"))
            p = torch.softmax(torch.cat([s_tok, s_bar], dim=-1), dim=-1).to(wt)
            o = torch.matmul(p[..., :N], vh) + torch.matmul(p[..., N:], vbar[b])
            out[b, r0 : r0 + rr.numel()] = o.to(q.dtype).to(ct).permute(1, 0, 2)
    return out


def check_close(out, ref, base, atol):
    """FlashAttention's rule: max|out-ref| <= 2 * max|base-ref| + atol, and no NaN. (ok, err, base err)."""
    err = (out.double() - ref.double()).abs().max().item()
    berr = (base.double() - ref.double()).abs().max().item()
    ok = err <= 2 * berr + atol and not torch.isnan(out).any().item()
    return ok, err, berr


def reference_out(out, q, k, v, plan: BlockPlan, scale: Optional[float] = None, rows: Optional[torch.Tensor] = None):
    """Compare ``out`` [B, N, H, D] with the reference on the same plan.

    Without ``rows`` (small problems): the whole reference in float64 against PyTorch in the input
    dtype (fp16/bf16: :func:`plan_rows_ref` with ``lowp``; fp32: the reference in float32). With
    ``rows`` [R] (large problems): those query rows only, reference in float32.
    """
    if rows is None:
        ref = execute_plan_reference(q.double(), k.double(), v.double(), plan, scale)
        if q.dtype == torch.float32:
            base = execute_plan_reference(q, k, v, plan, scale)
            atol = 1e-5
        else:
            base = plan_rows_ref(q, k, v, plan, torch.arange(q.shape[1], device=q.device), scale, lowp=True)
            atol = 2e-4
        return check_close(out, ref, base, atol)
    ref = plan_rows_ref(q, k, v, plan, rows, scale)
    base = plan_rows_ref(q, k, v, plan, rows, scale, lowp=True)
    return check_close(out[:, rows], ref, base, 1e-3 if q.dtype != torch.float32 else 1e-5)
