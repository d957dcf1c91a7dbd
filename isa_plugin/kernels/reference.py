"""Pure-PyTorch reference of ISA (In-context Sparse Attention), the ground truth for the kernels.

Tensor layout follows diffusers: q, k, v are [B, N, H, D] (sequence before heads); the output is
[B, N, H, D] in q's dtype. Math runs in float32 (float64 when given float64).

The forward pass (``ISA.md`` §2), per (batch, head):

1. block every span of the :class:`~isa_plugin.Layout` separately (size b, short last block);
2. block means q̄, k̄, v̄ (divided by the true counts);
3. pooled attention P = softmax(q̄ k̄ᵀ · scale) over all key blocks;
4. keep the ⌈α_s·C⌉ context key blocks with the largest Σ_{target query blocks} P; drop the rest for
   every query. KV' = target ∪ text ∪ kept context blocks;
5. sharpness of each query block from its pooled row (top-k mass over target key blocks, or ‖P‖²);
6. the ⌈α_f·Q⌉ sharpest of the Q non-text query blocks (and every text query block) attend exactly over KV';
7. every other query block computes exactly its top ⌈α_ns·K'⌉ non-text KV' blocks by q̄·k̄ (K' = number
   of non-text KV' blocks) plus all text blocks; each remaining KV' block j enters as one pseudo-key k̄_j
   with value v̄_j and logit bias ln(n_j), all in one softmax.

Planning (steps 1-7) and execution are separate so kernels can be checked against the reference on
the same plan (:func:`plan_reference`, :func:`execute_plan_reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..config import ISAConfig
from ..layout import CONTEXT, TARGET, TEXT, BlockLayout, Layout
from .counts import keep_count, topk_count

__all__ = [
    "ISAPlan",
    "dense_attention_reference",
    "pool_blocks",
    "plan_reference",
    "execute_plan_reference",
    "isa_attention_reference",
    "plan_pair_counts",
    "context_selection",
]


def plan_pair_counts(blocks: BlockLayout, kv_keep: torch.Tensor, exact_kv: torch.Tensor, pseudo_block: int,
                     per_head: bool = False, query_blocks: Optional[torch.Tensor] = None):
    """(exact token pairs, (query token, pseudo-key) pairs) of a plan, summed over batch and heads.

    Args:
        blocks: the plan's blocking; kv_keep [B, H, nb] bool; exact_kv [B, H, nb, nb] bool.
        pseudo_block: tokens per pseudo-key (the block size for the fixed mode: one pseudo-key per block).
        per_head: return float64 tensors [H] (summed over the batch) instead of two ints.
        query_blocks: [nb] bool, count only the rows of these query blocks (default: all).
    """
    dev = exact_kv.device
    cnt = blocks.counts.to(dev, torch.float64)
    n_pseudo = torch.ceil(cnt / pseudo_block)
    rows = cnt if query_blocks is None else cnt * query_blocks.to(dev)
    approx = kv_keep[:, :, None, :] & ~exact_kv
    exact = torch.einsum("bhij,i,j->h", exact_kv.double(), rows, cnt)
    pseudo = torch.einsum("bhij,i,j->h", approx.double(), rows, n_pseudo)
    if per_head:
        return exact, pseudo
    return int(round(float(exact.sum()))), int(round(float(pseudo.sum())))


@dataclass
class ISAPlan:
    """What ISA decided for one call: which blocks are kept, routed and computed exactly.

    All tensors live on the inputs' device; ``nb`` is the number of blocks of ``blocks``.

    Attributes:
        blocks: the per-span blocking the plan refers to.
        kv_keep: [B, H, nb] bool, key block is in KV' (target, text and kept context blocks).
        exact_query: [B, H, nb] bool, query block attends exactly over KV' (else Taylor branch).
        exact_kv: [B, H, nb, nb] bool, key blocks query block i computes exactly. For exact query
            blocks this equals ``kv_keep``; for Taylor blocks it is the top ⌈α_ns·K'⌉ blocks plus text.
        sharpness: [B, H, nb] float32, sharpness of each query block (+inf for text query blocks).
        saliency: [B, H, nb] float32, attention mass target queries put on each context block (0 elsewhere).
    """

    blocks: BlockLayout
    kv_keep: torch.Tensor
    exact_query: torch.Tensor
    exact_kv: torch.Tensor
    sharpness: torch.Tensor
    saliency: torch.Tensor

    @property
    def approx_kv(self) -> torch.Tensor:
        """[B, H, nb, nb] bool, KV' blocks that enter query block i as block means."""
        return self.kv_keep[:, :, None, :] & ~self.exact_kv

    @property
    def kept_context(self) -> torch.Tensor:
        """[B, H, nb] bool, context key blocks kept in KV'."""
        return self.kv_keep & (self.blocks.kinds == CONTEXT).to(self.kv_keep.device)

    def pair_counts(self) -> Tuple[int, int]:
        """(exact token pairs, (query token, block-mean pseudo-key) pairs), summed over batch and heads."""
        return plan_pair_counts(self.blocks, self.kv_keep, self.exact_kv, self.blocks.block_size)

    def relative_cost(self) -> float:
        """Exactly computed (query token, key token) pairs over those of dense attention."""
        cnt = self.blocks.counts.to(self.exact_kv.device, torch.float64)
        pairs = torch.einsum("bhij,i,j->bh", self.exact_kv.double(), cnt, cnt)
        means = torch.einsum("bhij,i->bh", self.approx_kv.double(), cnt)
        n = float(cnt.sum())
        return float(((pairs + means) / (n * n)).mean())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def dense_attention_reference(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """Plain softmax attention in [B, N, H, D] layout, math in fp32 (fp64 for fp64 inputs)."""
    ct = _compute_dtype(q)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * _scale(q, scale)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(ct)).to(q.dtype)


def pool_blocks(x: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """Block means of x [B, N, H, D] -> [B, H, nb, D] (compute dtype), dividing by true counts."""
    ct = _compute_dtype(x)
    B, N, H, D = x.shape
    blocks = blocks.to(x.device)
    out = torch.zeros(B, blocks.num_blocks, H, D, dtype=ct, device=x.device)
    out.index_add_(1, blocks.token_block, x.to(ct))
    out = out / blocks.counts.to(ct)[None, :, None, None]
    return out.permute(0, 2, 1, 3)


def _top_mask(scores: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mark the ``count`` highest ``scores`` among ``valid`` entries along the last dim (stable ties)."""
    s = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return (rank < count.unsqueeze(-1)) & valid


def context_selection(P: torch.Tensor, blocks: BlockLayout, alpha_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of ISA (both selection modes): keep the ⌈α_s·C⌉ context blocks target queries attend to most.

    Args:
        P: [B, H, nb, nb] pooled attention (softmax of q̄ k̄ᵀ · scale over all key blocks).
        blocks: the blocking (on P's device); alpha_s: [H] float64.

    Returns:
        ``(kv_keep, saliency)``: [B, H, nb] bool, key block is in KV'; [B, H, nb] saliency (Σ over target
        query blocks of P, 0 off context blocks). Ties keep the lower block index.
    """
    B, H, nb, _ = P.shape
    is_t, is_c = blocks.kinds == TARGET, blocks.kinds == CONTEXT
    saliency = (P * is_t[None, None, :, None]).sum(dim=2) * is_c  # [B, H, nb]
    n_ctx = int(is_c.sum())
    keep_ctx = _top_mask(saliency, is_c.expand(B, H, nb), keep_count(alpha_s, n_ctx)[None, :].expand(B, H))
    return ~is_c | keep_ctx, saliency


def plan_from_pooled(
    qbar: torch.Tensor, kbar: torch.Tensor, blocks: BlockLayout, config: ISAConfig, scale: float
) -> ISAPlan:
    """Steps 3-7 of ISA from block means q̄, k̄ of shape [B, H, nb, D].

    A ``config`` with ``mode="adaptive"`` gets the adaptive mode's plan
    (:func:`~isa_plugin.kernels.adaptive_reference.plan_adaptive_from_pooled`, an ``AdaptivePlan``).

    With ``config.share_plan`` the plan is computed once from the batch means of q̄ and k̄ and the same
    selections serve every batch entry (``sharpness`` / ``saliency`` are those of the shared plan).
    """
    if config.mode == "adaptive":
        from .adaptive_reference import plan_adaptive_from_pooled

        return plan_adaptive_from_pooled(qbar, kbar, blocks, config.adaptive, scale)
    B = qbar.shape[0]
    if config.share_plan and B > 1:
        shared = plan_from_pooled(qbar.mean(0, keepdim=True), kbar.mean(0, keepdim=True), blocks, config.replace(share_plan=False), scale)
        for f in ("kv_keep", "exact_query", "exact_kv", "sharpness", "saliency"):
            t = getattr(shared, f)
            setattr(shared, f, t.expand(B, *t.shape[1:]).contiguous())
        return shared
    B, H, nb, _ = qbar.shape
    dev = qbar.device
    blocks = blocks.to(dev)
    ratios = config.per_head(H, device=dev)
    kinds = blocks.kinds
    is_t, is_x = kinds == TARGET, kinds == TEXT

    logits = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale  # [B, H, nb, nb]
    P = torch.softmax(logits, dim=-1)

    # step 4: context pre-selection by the pooled attention mass of target query blocks
    kv_keep, saliency = context_selection(P, blocks, ratios["alpha_s"])  # [B, H, nb]

    # step 5: sharpness of each query block
    if config.sharpness == "topk_mass":
        n_t = int(is_t.sum())
        k = topk_count(config.topk_fraction, n_t)
        sharp = P[..., is_t].topk(k, dim=-1).values.sum(-1)
    else:
        sharp = (P * P).sum(-1)
    sharp = sharp.masked_fill(is_x, float("inf"))

    # step 6: grouping; text query blocks always exact
    n_q = int((~is_x).sum())
    exact_q = _top_mask(sharp, (~is_x).expand(B, H, nb), keep_count(ratios["alpha_f"], n_q)[None, :].expand(B, H))
    exact_q = exact_q | is_x

    # step 7: Taylor selections over non-text KV' blocks, plus all text blocks
    cand = (kv_keep & ~is_x)[:, :, None, :].expand(B, H, nb, nb)
    k_prime = (kv_keep & ~is_x).sum(-1)  # [B, H]
    n_exact = keep_count(ratios["alpha_ns"][None, :], k_prime)[:, :, None].expand(B, H, nb)
    taylor_sel = _top_mask(logits, cand, n_exact) | is_x
    exact_kv = torch.where(exact_q[..., None], kv_keep[:, :, None, :], taylor_sel)

    return ISAPlan(
        blocks=blocks,
        kv_keep=kv_keep,
        exact_query=exact_q,
        exact_kv=exact_kv,
        sharpness=sharp.float(),
        saliency=saliency.float(),
    )


def plan_reference(q, k, v, layout: Layout, config: ISAConfig, scale: Optional[float] = None) -> ISAPlan:
    """Steps 1-7 of ISA: the plan for q, k [B, N, H, D] (v is unused but kept for symmetry)."""
    blocks = layout.blocks(config.block_size).to(q.device)
    return plan_from_pooled(pool_blocks(q, blocks), pool_blocks(k, blocks), blocks, config, _scale(q, scale))


def execute_plan_reference(
    q, k, v, plan: ISAPlan, scale: Optional[float] = None, max_chunk_elems: int = 1 << 25
) -> torch.Tensor:
    """Run attention according to ``plan``: exact pairs plus block-mean pseudo-keys, one softmax.

    Args:
        q, k, v: [B, N, H, D].
        plan: from :func:`plan_reference` (or a kernel planner with the same fields), or an adaptive
            mode's ``AdaptivePlan``.
    Returns:
        [B, N, H, D] in q's dtype. A non-finite value anywhere in k or v of a (batch, head) makes that
        head's output NaN (for v, the affected feature columns), as in dense attention.
    """
    from .adaptive_reference import AdaptivePlan

    if isinstance(plan, AdaptivePlan):  # its pseudo-keys are sub-block means: the same plan over sub-blocks
        plan = plan.to_isa_plan()
    ct = _compute_dtype(q)
    sc = _scale(q, scale)
    B, N, H, D = q.shape
    blocks = plan.blocks.to(q.device)
    kbar = pool_blocks(k, blocks)
    vbar = pool_blocks(v, blocks)
    log_n = torch.log(blocks.counts.to(ct))
    qh = q.to(ct).permute(0, 2, 1, 3)
    kh = k.to(ct).permute(0, 2, 1, 3)
    vh = v.to(ct).permute(0, 2, 1, 3)
    tb = blocks.token_block
    approx = plan.approx_kv
    out = torch.empty(B, H, N, D, dtype=ct, device=q.device)
    nb = blocks.num_blocks
    chunk = max(1, max_chunk_elems // max(1, H * (N + nb)))
    for b in range(B):
        for s0 in range(0, N, chunk):
            s1 = min(N, s0 + chunk)
            qb = tb[s0:s1]
            qc = qh[b, :, s0:s1]  # [H, T, D]
            s_tok = torch.einsum("htd,hnd->htn", qc, kh[b]) * sc
            m_tok = plan.exact_kv[b][:, qb][:, :, tb]  # [H, T, N]
            s_tok = s_tok.masked_fill(~m_tok, float("-inf"))
            s_bar = torch.einsum("htd,hjd->htj", qc, kbar[b]) * sc + log_n
            s_bar = s_bar.masked_fill(~approx[b][:, qb], float("-inf"))
            p = torch.softmax(torch.cat([s_tok, s_bar], dim=-1), dim=-1)
            out[b, :, s0:s1] = p[..., :N] @ vh[b] + p[..., N:] @ vbar[b]
    # Dense attention turns a NaN/Inf anywhere in k or v into NaN outputs for the whole head, even when
    # ISA would have dropped that block; keep that behaviour (0 * non-finite = NaN, else 0).
    # A non-finite v element only poisons its own feature column, as in dense attention.
    out += (kbar.sum(dim=(2, 3)) * 0)[:, :, None, None] + (vbar.sum(dim=2) * 0)[:, :, None, :]
    return out.permute(0, 2, 1, 3).to(q.dtype)


def isa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    config: Optional[ISAConfig] = None,
    return_plan: bool = False,
    *,
    plan: Optional[ISAPlan] = None,
    scale: Optional[float] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ISAPlan]]:
    """ISA attention computed with plain PyTorch ops (exact semantics, no speed).

    Args:
        q, k, v: [B, N, H, D] (diffusers' layout), same shape and dtype.
        layout: the typed spans of the N tokens.
        config: ratios and block size (default :class:`ISAConfig`); with ``mode="adaptive"`` the adaptive
            mode's reference runs (the plan is then an ``AdaptivePlan``).
        return_plan: also return the :class:`ISAPlan`.
        plan: execute this plan instead of computing one (for testing kernels on the same plan).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, N, H, D] in q's dtype, or ``(out, plan)`` when ``return_plan``.

    Raises:
        ValueError: shapes that differ, or a layout that does not cover N tokens.

    Example:
        >>> q = k = v = torch.randn(1, 200, 2, 16)
        >>> out = isa_attention_reference(q, k, v, Layout([("target", 100), ("context", 100)]))
    """
    config = config or ISAConfig()
    if config.mode == "adaptive":
        from .adaptive_reference import adaptive_attention_reference

        return adaptive_attention_reference(q, k, v, layout, config.adaptive, return_plan, plan=plan, scale=scale)
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, N, H, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    layout.check(q.shape[1])
    if plan is None:
        plan = plan_reference(q, k, v, layout, config, scale)
    out = execute_plan_reference(q, k, v, plan, scale)
    return (out, plan) if return_plan else out
