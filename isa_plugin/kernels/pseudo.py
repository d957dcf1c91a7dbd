"""Pseudo-keys of a key block: contiguous sub-block means, or k-means centroids (``docs/ADAPTIVE.md``, step 6).

A plan's ``pseudo_keys`` names how the key blocks that a query block does not compute exactly enter its softmax.
Both kinds give every block ``C = block_size / pseudo_block`` *slots*, slot c starting as the tokens
[c·s, (c+1)·s) of the block (s = ``pseudo_block``; slots past a short block's end start empty):

- ``"mean"``: each non-empty slot is one pseudo-key, the mean key and value of its tokens, logit bias
  ln(its token count);
- ``"kmeans"``: the slots are refined by :data:`KMEANS_ITERS` Lloyd iterations on the block's keys: every token
  moves to the slot whose centroid is nearest (squared Euclidean distance, among the slots non-empty before the
  iteration; ties to the lowest slot), then each slot's centroid is the mean key of its tokens. A slot left
  empty keeps its last centroid but gets no weight. Each non-empty slot is one pseudo-key: centroid, mean value
  of its tokens, bias ln(its token count).

The number of pseudo-keys per block is the same for both kinds (⌈n_j / s⌉ slots start non-empty; a k-means
slot can only empty), so plans cost the same pairs; k-means places them where the keys are. Every executor and
the calibration measurement build k-means slots with :func:`kmeans_slots`; the block-sparse executor with the
Triton kernel of :mod:`.pseudo_triton`, the same iteration with the key dots in the input dtype.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..validation import validate_choice

__all__ = ["PSEUDO_KEYS", "KMEANS_ITERS", "validate_pseudo_keys", "kmeans_slots", "padded_blocks"]

#: the kinds of pseudo-keys a plan may name
PSEUDO_KEYS = ("mean", "kmeans")
#: Lloyd iterations of the k-means pseudo-keys (part of their definition: every implementation runs this many)
KMEANS_ITERS = 5


def validate_pseudo_keys(name: str, value) -> str:
    """``value`` if it is one of :data:`PSEUDO_KEYS`, else a ValueError naming ``name`` and the choices."""
    return validate_choice(name, value, PSEUDO_KEYS)


def padded_blocks(x: torch.Tensor, blocks, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, H, D] laid out per block: ([B, H, nb, b, D] in ``dtype``, zero past a short block's end; the
    valid slots [nb, b] bool)."""
    blocks = blocks.to(x.device)
    b = blocks.block_size
    ar = torch.arange(b, device=x.device)
    valid = ar[None, :] < blocks.counts[:, None]
    idx = torch.where(valid, blocks.starts[:, None] + ar[None, :], torch.zeros((), dtype=torch.int64, device=x.device))
    out = x[:, idx].to(dtype) * valid[None, :, :, None, None]  # [B, nb, b, H, D]
    return out.permute(0, 3, 1, 2, 4), valid


@torch.no_grad()
def kmeans_slots(k_blk: torch.Tensor, v_blk: torch.Tensor, valid: torch.Tensor, pseudo_block: int,
                 iters: int = KMEANS_ITERS) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-means pseudo-keys of every block (module docstring), in the inputs' dtype.

    Args:
        k_blk, v_blk: [..., nb, b, D] keys and values per block (:func:`padded_blocks`), zero on invalid slots.
        valid: [nb, b] bool, the slots that hold a token.
        pseudo_block: s, tokens per initial slot (divides b).
        iters: Lloyd iterations (the definition's :data:`KMEANS_ITERS`; other values for studies only).

    Returns:
        ``(centroids [..., nb, C, D], values [..., nb, C, D], counts [..., nb, C])``, C = b / s; counts are the
        slots' token counts (0: empty, no pseudo-key), in the inputs' dtype.
    """
    b = k_blk.shape[-2]
    s = int(pseudo_block)
    if s < 1 or b % s:
        raise ValueError(f"pseudo_block={pseudo_block} must divide the block size {b}")
    C = b // s
    w = valid.to(k_blk.dtype)[..., None]  # [nb, b, 1]
    assign = (torch.arange(b, device=k_blk.device) // s).expand(valid.shape)  # [nb, b]
    onehot = torch.nn.functional.one_hot(assign, C).to(k_blk.dtype) * w  # [nb, b, C]
    oh_t = onehot.transpose(-1, -2)
    cnt = oh_t.sum(-1).expand(*k_blk.shape[:-2], C)  # [..., nb, C]
    cent = (oh_t @ k_blk) / cnt.clamp(min=1)[..., None]
    for _ in range(iters):
        # nearest centroid: |k - c|^2 = |k|^2 - 2 k.c + |c|^2, the |k|^2 term is the same for every slot
        dist = (cent * cent).sum(-1)[..., None, :] - 2.0 * (k_blk @ cent.transpose(-1, -2))  # [..., nb, b, C]
        dist = dist.masked_fill((cnt == 0)[..., None, :], float("inf"))
        oh_t = (torch.nn.functional.one_hot(dist.argmin(-1), C).to(k_blk.dtype) * w).transpose(-1, -2)  # [..., nb, C, b]
        new_cnt = oh_t.sum(-1)
        cent = torch.where((new_cnt > 0)[..., None], (oh_t @ k_blk) / new_cnt.clamp(min=1)[..., None], cent)
        cnt = new_cnt
    vals = (oh_t @ v_blk) / cnt.clamp(min=1)[..., None]
    return cent, vals, cnt
