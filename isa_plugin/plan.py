"""The one plan form: what a selection mode decided for one attention call, and what an executor runs.

A :class:`BlockPlan` refers to the per-span blocking of the call (:class:`~isa_plugin.layout.BlockLayout`,
``nb`` blocks) and holds, for every batch entry b and head h:

- ``kv_keep`` [B, H, nb] bool: the key blocks kept (KV': target, text and the kept context blocks);
  every other key block is dropped for every query;
- the exact key blocks of every query block, as CSR lists: query block i of (b, h) attends exactly to
  the key blocks ``col_idx[b, h, row_ptr[b, h, i] : row_ptr[b, h, i + 1]]`` (ascending, a subset of
  KV'); ``row_ptr`` [B, H, nb + 1] int64 starts at 0 for every (b, h), ``col_idx`` [B, H, nnz] int64 is
  padded with -1 past ``row_ptr[b, h, nb]``;
- ``pseudo_block``: the pseudo-key granularity. Every KV' block that is not exact for a query block
  enters its softmax as pseudo-keys: the means of its sub-blocks of ``pseudo_block`` tokens, each with
  logit bias ln(its token count). ``pseudo_block == blocks.block_size`` is one block-mean pseudo-key per
  block (ISA's 0th-order Taylor term);
- ``pseudo_keys``: how the pseudo-keys are formed, ``"mean"`` (the sub-block means above) or ``"kmeans"``
  (the same number of slots per block, refined by k-means on the block's keys: :mod:`isa_plugin.kernels.pseudo`).

``full_rows`` [B, H, nb] bool marks the query blocks whose exact list is all of KV' (an executor may run
them as dense attention over KV'). ``diagnostics`` holds what the mode measured while planning
([B, H, nb] tensors such as ``sharpness``, ``saliency`` or ``covered``); executors ignore it.

The paper's fixed ratios make such a plan (the sharp query blocks have full rows, every other non-text
query block the same number of exact blocks); so does every other selection mode
(:mod:`isa_plugin.selection`). Executors (:mod:`isa_plugin.kernels`) run any plan and know nothing of
modes; :func:`isa_plugin.kernels.reference.execute_plan_reference` is the specification they are tested
against.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .kernels.pseudo import KMEANS_ITERS, validate_pseudo_keys
from .layout import BlockLayout

__all__ = ["BlockPlan"]


class BlockPlan:
    """Kept key blocks, per-query-block exact key-block lists (CSR) and the pseudo-key granularity.

    Attributes:
        blocks: the per-span blocking the plan refers to (``nb`` blocks).
        kv_keep: [B, H, nb] bool, key block is in KV'.
        row_ptr: [B, H, nb + 1] int64, CSR offsets of every (b, h)'s lists (``row_ptr[..., 0] == 0``).
        col_idx: [B, H, nnz] int64, exact key blocks per query block, ascending; -1 past the last offset.
        pseudo_block: tokens per pseudo-key (divides ``blocks.block_size``).
        pseudo_keys: ``"mean"`` or ``"kmeans"`` (:mod:`isa_plugin.kernels.pseudo`).
        full_rows: [B, H, nb] bool, the query block's exact list is all of KV'.
        diagnostics: the mode's per-block diagnostics, [B, H, nb] tensors by name.

    Build one from lists (the constructor) or from boolean masks (:meth:`from_masks`); each form is computed
    from the other on first use, so a plan made from masks on the GPU costs no host synchronisation until
    its lists are read.

    Example:
        >>> from isa_plugin.layout import Layout
        >>> blocks = Layout([("target", 128), ("context", 128)]).blocks(64)
        >>> keep = torch.ones(1, 1, 4, dtype=torch.bool)
        >>> plan = BlockPlan.from_masks(blocks, keep, torch.eye(4, dtype=torch.bool)[None, None], pseudo_block=64)
        >>> plan.exact_counts().tolist()
        [[[1, 1, 1, 1]]]
        >>> plan.pair_counts()   # 4 query blocks x 64 tokens x (64 exact keys, 3 pseudo-keys)
        (16384, 768)
    """

    def __init__(self, blocks: BlockLayout, kv_keep: torch.Tensor, row_ptr: Optional[torch.Tensor], col_idx: Optional[torch.Tensor],
                 pseudo_block: int, diagnostics: Optional[Dict[str, torch.Tensor]] = None, *, _mask: Optional[torch.Tensor] = None,
                 pseudo_keys: str = "mean"):
        if (row_ptr is None or col_idx is None) and _mask is None:
            raise ValueError("a BlockPlan needs its exact lists (row_ptr, col_idx) or an exact mask (BlockPlan.from_masks)")
        self.blocks = blocks
        self.kv_keep = kv_keep
        self._row_ptr, self._col_idx, self._mask = row_ptr, col_idx, _mask
        self._full = None
        self.pseudo_block = int(pseudo_block)
        self.pseudo_keys = validate_pseudo_keys("BlockPlan.pseudo_keys", pseudo_keys)
        self.diagnostics = dict(diagnostics or {})

    def __repr__(self) -> str:
        return (f"BlockPlan(shape={self.shape}, block_size={self.blocks.block_size}, pseudo_block={self.pseudo_block}, "
                f"pseudo_keys={self.pseudo_keys!r})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_masks(cls, blocks: BlockLayout, kv_keep: torch.Tensor, exact_kv: torch.Tensor, pseudo_block: int,
                   diagnostics: Optional[Dict[str, torch.Tensor]] = None, validate: Optional[bool] = None,
                   pseudo_keys: str = "mean") -> "BlockPlan":
        """A plan from dense masks.

        Args:
            blocks: the blocking (``nb`` blocks).
            kv_keep: [B, H, nb] bool, kept key blocks.
            exact_kv: [B, H, nb, nb] bool, key blocks query block i computes exactly (must lie in KV').
            pseudo_block: tokens per pseudo-key.
            diagnostics: the mode's [B, H, nb] diagnostics.
            validate: check that exact blocks are kept (default: off CUDA only, where it costs no
                synchronisation).
            pseudo_keys: ``"mean"`` or ``"kmeans"``.

        Raises:
            ValueError: shapes that do not match ``blocks``, or exact key blocks outside KV'.
        """
        B, H, nb = kv_keep.shape
        if nb != blocks.num_blocks or tuple(exact_kv.shape) != (B, H, nb, nb):
            raise ValueError(f"plan masks kv_keep {tuple(kv_keep.shape)} / exact_kv {tuple(exact_kv.shape)} do not match "
                             f"{blocks.num_blocks} blocks")
        if (not exact_kv.is_cuda if validate is None else validate) and bool((exact_kv & ~kv_keep[:, :, None, :]).any()):
            raise ValueError("exact key blocks must be kept key blocks (exact_kv within kv_keep)")
        return cls(blocks, kv_keep, None, None, pseudo_block, diagnostics, _mask=exact_kv, pseudo_keys=pseudo_keys)

    def _lists(self) -> None:
        exact_kv = self._mask
        B, H, nb = self.shape
        row_len = exact_kv.sum(-1)  # [B, H, nb]
        row_ptr = torch.zeros(B, H, nb + 1, dtype=torch.int64, device=exact_kv.device)
        torch.cumsum(row_len, dim=-1, out=row_ptr[..., 1:])
        # on CUDA the lists keep room for every pair (no host synchronisation for their length)
        nnz = nb * nb if exact_kv.is_cuda else max(1, int(row_ptr[..., -1].max()) if row_ptr.numel() else 1)
        # a permutation of the nb * nb pairs: exact pair f goes to E(f), the number of exact pairs before it in
        # (row, column) order; every other pair to total + (f - E(f)), past the lists (two scans, one scatter)
        before = torch.cumsum(exact_kv, dim=-1) - exact_kv.long() + row_ptr[..., :-1, None]  # E(f): [B, H, nb, nb]
        f = torch.arange(nb * nb, device=exact_kv.device).view(nb, nb)
        dest = torch.where(exact_kv, before, row_ptr[..., -1:, None] + f - before).reshape(B, H, nb * nb)
        col = torch.where(exact_kv, f % nb, -1).reshape(B, H, nb * nb)
        col_idx = torch.empty_like(col).scatter_(-1, dest, col)
        self._row_ptr, self._col_idx = row_ptr, col_idx[..., :nnz]

    @property
    def row_ptr(self) -> torch.Tensor:
        if self._row_ptr is None:
            self._lists()
        return self._row_ptr

    @property
    def col_idx(self) -> torch.Tensor:
        if self._col_idx is None:
            self._lists()
        return self._col_idx

    @property
    def full_rows(self) -> torch.Tensor:
        if self._full is None:
            self._full = (self.exact_mask() == self.kv_keep[:, :, None, :]).all(-1)
        return self._full

    @property
    def mean_pseudo_keys(self) -> bool:
        """Every pseudo-key is the mean of contiguous tokens: ``"mean"`` pseudo-keys, or one per block (the block
        mean, whatever the kind)."""
        return self.pseudo_keys == "mean" or self.pseudo_block == self.blocks.block_size

    @property
    def pseudo_key_iterations(self) -> int:
        """Lloyd iterations that form the pseudo-key slots from their starting sub-blocks: 0 for means,
        :data:`~isa_plugin.kernels.pseudo.KMEANS_ITERS` for k-means slots."""
        return 0 if self.mean_pseudo_keys else KMEANS_ITERS

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> Tuple[int, int, int]:
        """(B, H, nb)."""
        return tuple(self.kv_keep.shape)

    def exact_counts(self) -> torch.Tensor:
        """[B, H, nb] int64, exact key blocks of every query block."""
        if self._row_ptr is None:
            return self._mask.sum(-1)
        return self._row_ptr[..., 1:] - self._row_ptr[..., :-1]

    def exact_mask(self) -> torch.Tensor:
        """[B, H, nb, nb] bool, key block j is exact for query block i (computed from the lists once)."""
        if self._mask is None:
            B, H, nb = self.shape
            row = torch.searchsorted(self.row_ptr[..., 1:].contiguous(), torch.arange(self.col_idx.shape[-1], device=self.col_idx.device)
                                     .expand(B, H, -1).contiguous(), right=True)  # [B, H, nnz] query block of every entry
            valid = self.col_idx >= 0
            flat = torch.zeros(B, H, nb * nb + 1, dtype=torch.bool, device=self.col_idx.device)
            pos = torch.where(valid, row * nb + self.col_idx, torch.full_like(row, nb * nb))
            flat.scatter_(-1, pos, True)
            self._mask = flat[..., : nb * nb].view(B, H, nb, nb)
        return self._mask

    def approx_mask(self) -> torch.Tensor:
        """[B, H, nb, nb] bool, KV' blocks that enter query block i as pseudo-keys."""
        return self.kv_keep[:, :, None, :] & ~self.exact_mask()

    # ------------------------------------------------------------------ cost
    def pair_counts(self, per_head: bool = False, query_blocks: Optional[torch.Tensor] = None):
        """(exact token pairs, (query token, pseudo-key) pairs), summed over batch and heads.

        Args:
            per_head: return float64 tensors [H] (summed over the batch) instead of two ints.
            query_blocks: [nb] bool, count only the rows of these query blocks (default: all).
        """
        exact_kv = self.exact_mask()
        dev = exact_kv.device
        cnt = self.blocks.counts.to(dev, torch.float64)
        n_pseudo = torch.ceil(cnt / self.pseudo_block)
        rows = cnt if query_blocks is None else cnt * query_blocks.to(dev)
        approx = self.kv_keep[:, :, None, :] & ~exact_kv
        exact = torch.einsum("bhij,i,j->h", exact_kv.double(), rows, cnt)
        pseudo = torch.einsum("bhij,i,j->h", approx.double(), rows, n_pseudo)
        if per_head:
            return exact, pseudo
        return int(round(float(exact.sum()))), int(round(float(pseudo.sum())))

    def relative_cost(self) -> float:
        """(exact + pseudo pairs) over the pairs of dense attention (N²·B·H)."""
        e, a = self.pair_counts()
        B, H = self.kv_keep.shape[:2]
        n = self.blocks.num_tokens
        return (e + a) / (float(n) * n * B * H)

    # ------------------------------------------------------------------ transforms
    def at_pseudo_granularity(self) -> "BlockPlan":
        """The same attention as a plan over the sub-blocks of ``pseudo_block`` tokens, whose pseudo-keys are
        then one mean per (sub-)block: what an executor with block-mean pseudo-keys runs. ``self`` when
        ``pseudo_block`` is the block size.

        Raises:
            ValueError: a plan with k-means pseudo-keys (their slots are not contiguous tokens).
        """
        if self.pseudo_block == self.blocks.block_size:
            return self
        if not self.mean_pseudo_keys:
            raise ValueError(f"a plan with pseudo_keys={self.pseudo_keys!r} has no finer blocking: its pseudo-keys are "
                             "k-means slots of whole blocks (run it at its own blocking)")
        sub, parent = self.blocks.split(self.pseudo_block)
        parent = parent.to(self.kv_keep.device)
        exact = self.exact_mask()[:, :, parent][:, :, :, parent]
        keep = self.kv_keep[:, :, parent]
        diag = {k: v[:, :, parent] for k, v in self.diagnostics.items()}
        return BlockPlan.from_masks(sub.to(self.kv_keep.device), keep, exact, self.pseudo_block, diag)

    def expand_batch(self, batch: int) -> "BlockPlan":
        """A plan of batch 1 repeated for ``batch`` entries (one plan shared by a batch, e.g. a CFG pair)."""
        if self.kv_keep.shape[0] != 1:
            raise ValueError(f"expand_batch needs a plan of batch 1, got batch {self.kv_keep.shape[0]}")
        rep = lambda t: None if t is None else t.expand(batch, *t.shape[1:]).contiguous()  # noqa: E731
        return BlockPlan(self.blocks, rep(self.kv_keep), rep(self._row_ptr), rep(self._col_idx), self.pseudo_block,
                         {k: rep(v) for k, v in self.diagnostics.items()}, _mask=rep(self._mask), pseudo_keys=self.pseudo_keys)
