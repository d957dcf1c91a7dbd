"""Pure-PyTorch reference of ISA's adaptive selection mode (``docs/ADAPTIVE.md``).

Layout as in :mod:`~isa_plugin.kernels.reference`: q, k, v are [B, N, H, D]; math in float32 (float64 for
float64 inputs). Per (batch, head):

1. blocks and block means as in the fixed mode; the fixed mode's context pre-selection (α_s) gives KV';
2. pooled mass m_ij ∝ n_j·exp(q̄_i·k̄_j·scale) over KV' (count bias ln n_j);
3. each non-text query block computes exactly every text block plus the fewest non-text KV' blocks (by
   descending m_ij, stable) whose mass, with the text blocks', reaches p (``context_mass`` for context query
   blocks, ``mass`` for the others), clamped to [min_blocks, max_blocks];
   text query blocks attend exactly over KV';
4. every other KV' block enters as pseudo-keys: the means of its sub-blocks of ``pseudo_block`` tokens, each
   with logit bias ln(its token count); one softmax over exact keys and pseudo-keys.

Planning and execution are separate (:func:`plan_adaptive`, :func:`execute_adaptive_reference`). Execution
expands the plan to sub-block granularity (:meth:`AdaptivePlan.to_isa_plan`) and runs the fixed mode's
executor, whose pseudo-keys are then exactly the sub-block means.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..config import AdaptiveSettings
from ..layout import CONTEXT, TEXT, BlockLayout, Layout
from .reference import ISAPlan, _scale, context_selection, execute_plan_reference, plan_pair_counts, pool_blocks

__all__ = [
    "AdaptivePlan",
    "plan_adaptive",
    "plan_adaptive_from_pooled",
    "execute_adaptive_reference",
    "adaptive_attention_reference",
    "sub_blocks",
    "plan_pair_counts",
]


@functools.lru_cache(maxsize=64)
def _sub_blocks(blocks: BlockLayout, s: int) -> Tuple[BlockLayout, torch.Tensor]:
    cnt = blocks.counts
    n_sub = (cnt + s - 1) // s  # [nb]
    parent = torch.repeat_interleave(torch.arange(blocks.num_blocks, device=cnt.device), n_sub)
    first = torch.cumsum(n_sub, 0) - n_sub
    local = torch.arange(parent.numel(), device=cnt.device) - first[parent]  # index of the sub-block in its block
    starts = blocks.starts[parent] + local * s
    counts = torch.minimum(cnt[parent] - local * s, torch.full_like(local, s))
    token_block = torch.repeat_interleave(torch.arange(parent.numel(), device=cnt.device), counts)
    sub = BlockLayout(block_size=s, starts=starts, counts=counts, kinds=blocks.kinds[parent], spans=blocks.spans[parent],
                      token_block=token_block)
    return sub, parent


def sub_blocks(blocks: BlockLayout, s: int) -> Tuple[BlockLayout, torch.Tensor]:
    """Split every block of ``blocks`` into sub-blocks of ``s`` tokens (the last one short).

    Returns:
        ``(sub, parent)``: the sub-block :class:`BlockLayout` (``block_size = s``) and ``parent`` [n_sub]
        int64, the block each sub-block belongs to. Sub-blocks of one block are contiguous and in order.
    """
    return _sub_blocks(blocks, int(s))


@dataclass
class AdaptivePlan:
    """What the adaptive mode decided for one call.

    Attributes:
        blocks: the per-span blocking.
        pseudo_block: tokens per pseudo-key.
        kv_keep: [B, H, nb] bool, key block is in KV'.
        exact_kv: [B, H, nb, nb] bool, key blocks query block i computes exactly (text blocks included).
        n_exact: [B, H, nb] int64, exact non-text key blocks of each query block.
        covered: [B, H, nb], pooled mass (count-biased, over KV') held by the exact blocks.
        saliency: [B, H, nb] float32, the context pre-selection's saliency (0 off context blocks).
    """

    blocks: BlockLayout
    pseudo_block: int
    kv_keep: torch.Tensor
    exact_kv: torch.Tensor
    n_exact: torch.Tensor
    covered: torch.Tensor
    saliency: torch.Tensor

    @property
    def approx_kv(self) -> torch.Tensor:
        """[B, H, nb, nb] bool, KV' blocks that enter query block i as pseudo-keys."""
        return self.kv_keep[:, :, None, :] & ~self.exact_kv

    def pair_counts(self) -> Tuple[int, int]:
        """(exact token pairs, (query token, pseudo-key) pairs), summed over batch and heads."""
        return plan_pair_counts(self.blocks, self.kv_keep, self.exact_kv, self.pseudo_block)

    def relative_cost(self) -> float:
        """(exact + pseudo pairs) over the pairs of dense attention (N²·B·H)."""
        e, a = self.pair_counts()
        B, H = self.kv_keep.shape[:2]
        n = self.blocks.num_tokens
        return (e + a) / (float(n) * n * B * H)

    def to_isa_plan(self) -> ISAPlan:
        """The same attention as an :class:`ISAPlan` over the sub-blocks (its block means are the pseudo-keys)."""
        sub, parent = sub_blocks(self.blocks, self.pseudo_block)
        parent = parent.to(self.exact_kv.device)
        exact = self.exact_kv[:, :, parent][:, :, :, parent]
        keep = self.kv_keep[:, :, parent]
        return ISAPlan(blocks=sub.to(self.exact_kv.device), kv_keep=keep, exact_kv=exact,
                       exact_query=(self.exact_kv == self.kv_keep[:, :, None, :]).all(-1)[:, :, parent],
                       sharpness=torch.zeros_like(keep, dtype=torch.float32), saliency=self.saliency[:, :, parent])


def plan_adaptive_from_pooled(qbar: torch.Tensor, kbar: torch.Tensor, blocks: BlockLayout, settings: AdaptiveSettings,
                              scale: float) -> AdaptivePlan:
    """Steps 2-4 of the adaptive mode from block means q̄, k̄ [B, H, nb, D] (float32 or float64).

    With ``settings.share_plan`` the selections come from the batch means of q̄, k̄ and serve every entry.
    """
    B, H, nb, _ = qbar.shape
    if settings.share_plan and B > 1:
        one = plan_adaptive_from_pooled(qbar.mean(0, keepdim=True), kbar.mean(0, keepdim=True), blocks,
                                        AdaptiveSettings(**{**settings.to_dict(), "share_plan": False}), scale)
        for f in ("kv_keep", "exact_kv", "n_exact", "covered", "saliency"):
            t = getattr(one, f)
            setattr(one, f, t.expand(B, *t.shape[1:]).contiguous())
        return one
    dev = qbar.device
    blocks = blocks.to(dev)
    ph = settings.per_head(H, device=dev)
    is_x = blocks.kinds == TEXT
    raw = torch.einsum("bhid,bhjd->bhij", qbar, kbar) * scale  # [B, H, nb, nb]
    # the fixed mode's context pre-selection (its pooled softmax has no count bias)
    kv_keep, saliency = context_selection(torch.softmax(raw, dim=-1), blocks, ph["alpha_s"])  # [B, H, nb]

    # pooled mass with the count bias, over KV'
    log_n = torch.log(blocks.counts.to(qbar.dtype))
    logits = (raw + log_n).masked_fill(~kv_keep[:, :, None, :], float("-inf"))
    m = torch.softmax(logits, dim=-1)  # [B, H, nb, nb]
    text_mass = (m * is_x).sum(-1)  # [B, H, nb]

    cand = (kv_keep & ~is_x)[:, :, None, :].expand(B, H, nb, nb)
    k_prime = cand[:, :, 0, :].sum(-1)  # [B, H]
    order = torch.sort(m.masked_fill(~cand, -1.0), dim=-1, descending=True, stable=True).indices
    m_sorted = torch.gather(m, -1, order).masked_fill(~torch.gather(cand, -1, order), 0.0)
    prefix = torch.cumsum(m_sorted, -1)
    prefix = torch.cat([torch.zeros_like(prefix[..., :1]), prefix[..., :-1]], -1)  # S_k, k = 0 .. nb-1
    pos = torch.arange(nb, device=dev)
    # the threshold of each query block: context_mass for context query blocks, mass for the others
    p_q = torch.where((blocks.kinds == CONTEXT)[None, :], ph["context_mass"][:, None], ph["mass"][:, None])  # [H, nb]
    below = (text_mass[..., None] + prefix < p_q.to(m.dtype)[None, :, :, None]) & (pos < k_prime[:, :, None, None])
    k_star = below.sum(-1)  # [B, H, nb]
    k_star = torch.where((p_q >= 1.0)[None], k_prime[:, :, None].expand_as(k_star), k_star)
    kp = k_prime[:, :, None]
    lo = torch.minimum(ph["min_blocks"][None, :, None], kp)
    hi = torch.where(ph["max_blocks"][None, :, None] > 0, torch.minimum(ph["max_blocks"][None, :, None], kp), kp)
    n_exact = torch.minimum(torch.maximum(k_star, lo), hi)
    # text query blocks: all of KV'
    n_exact = torch.where(is_x[None, None, :], kp.expand_as(n_exact), n_exact)

    rank = torch.empty_like(order)
    rank.scatter_(-1, order, pos.expand_as(order))
    exact_kv = ((rank < n_exact[..., None]) & cand) | (is_x & kv_keep)[:, :, None, :]
    covered = (m * exact_kv).sum(-1)
    return AdaptivePlan(blocks=blocks, pseudo_block=settings.pseudo_block, kv_keep=kv_keep, exact_kv=exact_kv,
                        n_exact=n_exact, covered=covered, saliency=saliency.float())


def plan_adaptive(q: torch.Tensor, k: torch.Tensor, layout: Layout, settings: Optional[AdaptiveSettings] = None,
                  scale: Optional[float] = None) -> AdaptivePlan:
    """The adaptive mode's plan for q, k [B, N, H, D] (block means in float32, float64 for float64 inputs).

    Args:
        q, k: [B, N, H, D].
        layout: the typed spans of the N tokens.
        settings: :class:`AdaptiveSettings` (default values when None).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        An :class:`AdaptivePlan`.

    Raises:
        ValueError: a layout that does not cover N tokens, per-head settings of the wrong length.

    Example:
        >>> q = k = torch.randn(1, 256, 2, 16)
        >>> plan = plan_adaptive(q, k, Layout([("target", 128), ("context", 128)]), AdaptiveSettings(mass=0.8))
        >>> exact_pairs, pseudo_pairs = plan.pair_counts()
    """
    settings = settings or AdaptiveSettings()
    layout.check(q.shape[1])
    blocks = layout.blocks(settings.block_size).to(q.device)
    return plan_adaptive_from_pooled(pool_blocks(q, blocks), pool_blocks(k, blocks), blocks, settings, _scale(q, scale))


def execute_adaptive_reference(q, k, v, plan: AdaptivePlan, scale: Optional[float] = None) -> torch.Tensor:
    """Run attention according to an :class:`AdaptivePlan`: exact pairs plus sub-block pseudo-keys, one softmax.

    Args:
        q, k, v: [B, N, H, D].
        plan: from :func:`plan_adaptive` (or a GPU planner with the same fields).

    Returns:
        [B, N, H, D] in q's dtype; non-finite k/v propagate as in dense attention.
    """
    return execute_plan_reference(q, k, v, plan.to_isa_plan(), scale)


def adaptive_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    settings: Optional[AdaptiveSettings] = None,
    return_plan: bool = False,
    *,
    plan: Optional[AdaptivePlan] = None,
    scale: Optional[float] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, AdaptivePlan]]:
    """ISA's adaptive mode computed with plain PyTorch ops (exact semantics, no speed).

    Args:
        q, k, v: [B, N, H, D], same shape and dtype.
        layout: the typed spans of the N tokens.
        settings: :class:`AdaptiveSettings` (default values when None).
        return_plan: also return the :class:`AdaptivePlan`.
        plan: execute this plan instead of computing one.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, N, H, D] in q's dtype, or ``(out, plan)`` when ``return_plan``.

    Raises:
        ValueError: shapes that differ, a layout that does not cover N tokens.

    Example:
        >>> q = k = v = torch.randn(1, 200, 2, 16)
        >>> out = adaptive_attention_reference(q, k, v, Layout([("target", 100), ("context", 100)]))
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, N, H, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if plan is None:
        plan = plan_adaptive(q, k, layout, settings, scale)
    else:
        layout.check(q.shape[1])
    out = execute_adaptive_reference(q, k, v, plan, scale)
    return (out, plan) if return_plan else out
