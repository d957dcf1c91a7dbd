"""Helpers shared by the kernel tests and the benchmark: plan execution on a subset of query rows.

:func:`plan_rows` runs the reference semantics of
:func:`~isa_plugin.kernels.reference.execute_plan_reference` for chosen query tokens only (so large
problems can be checked on a sample of rows), either in float32/float64 (``lowp=False``) or the way
plain PyTorch would compute it in the input dtype (``lowp=True``: scores and P·V in the input dtype,
softmax in float32) — the baseline of FlashAttention's tolerance rule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..plan import BlockPlan
from .reference import plan_pseudo_keys

__all__ = ["plan_rows", "check_close"]


def plan_rows(q, k, v, plan: BlockPlan, rows: torch.Tensor, scale: Optional[float] = None, lowp: bool = False, chunk: int = 256):
    """Outputs [B, R, H, D] (float32, float64 for float64 inputs) of ``plan`` at query tokens ``rows`` [R]."""
    B, N, H, D = q.shape
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    wt = q.dtype if lowp else ct
    plan, kbar, vbar, log_n, C = plan_pseudo_keys(k, v, plan, ct)  # [B, H, P, D] pseudo-keys, [B, H, P] log counts
    kbar, vbar = kbar.to(wt), vbar.to(wt)
    blocks = plan.blocks.to(q.device)
    tb = blocks.token_block
    kh = k.to(wt).permute(0, 2, 1, 3)
    vh = v.to(wt).permute(0, 2, 1, 3)
    exact_kv, approx = plan.exact_mask(), plan.approx_mask()
    out = torch.empty(B, rows.numel(), H, D, dtype=ct, device=q.device)
    for b in range(B):
        for r0 in range(0, rows.numel(), chunk):
            rr = rows[r0 : r0 + chunk]
            qb = tb[rr]
            qc = q[b, rr].to(wt).permute(1, 0, 2)  # [H, T, D]
            s_tok = torch.matmul(qc, kh[b].transpose(-1, -2)).to(ct) * sc
            s_tok = s_tok.masked_fill(~exact_kv[b][:, qb][:, :, tb], float("-inf"))
            s_bar = torch.matmul(qc, kbar[b].transpose(-1, -2)).to(ct) * sc + log_n[b][:, None, :]
            s_bar = s_bar.masked_fill(~approx[b][:, qb].repeat_interleave(C, -1), float("-inf"))
            p = torch.softmax(torch.cat([s_tok, s_bar], dim=-1), dim=-1).to(wt)
            o = torch.matmul(p[..., :N], vh[b]) + torch.matmul(p[..., N:], vbar[b])
            out[b, r0 : r0 + rr.numel()] = o.to(q.dtype).to(ct).permute(1, 0, 2)
    return out


def check_close(out, ref, base, name="", atol=1e-5):
    """FlashAttention's rule: max|out-ref| <= 2 * max|base-ref| + atol (base: PyTorch in the same dtype).

    Returns (ok, kernel error, baseline error).
    """
    err = (out.double() - ref.double()).abs().max().item()
    berr = (base.double() - ref.double()).abs().max().item()
    ok = err <= 2 * berr + atol and not torch.isnan(out).any().item()
    return ok, err, berr
