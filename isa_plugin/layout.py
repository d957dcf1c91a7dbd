"""Token layouts: which tokens of an attention call are target, context or text.

A :class:`Layout` is an ordered list of typed spans. ISA blocks every span on its own, so a
block never straddles two spans and the last block of a span may be short; :class:`BlockLayout`
holds the resulting block boundaries, kinds and true token counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["Layout", "BlockLayout", "SPAN_KINDS", "TARGET", "CONTEXT", "TEXT"]

TARGET, CONTEXT, TEXT = 0, 1, 2
SPAN_KINDS = {"target": TARGET, "context": CONTEXT, "text": TEXT}


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per-span blocking of a :class:`Layout` for one block size.

    Attributes:
        block_size: nominal block size b.
        starts: [nb] int64, first token of each block.
        counts: [nb] int64, true token count of each block (1..b).
        kinds: [nb] int64, span kind of each block (0 target, 1 context, 2 text).
        spans: [nb] int64, index of the span each block belongs to.
        token_block: [N] int64, block index of each token.
        kind_counts: number of blocks of each kind (indexed by kind), known on the host: :meth:`count` reads
            no device tensor when it is set (the layout's own blockings and their device copies set it).
    """

    block_size: int
    starts: torch.Tensor
    counts: torch.Tensor
    kinds: torch.Tensor
    spans: torch.Tensor
    token_block: torch.Tensor
    kind_counts: Optional[Tuple[int, ...]] = None

    @property
    def num_blocks(self) -> int:
        return int(self.starts.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.token_block.numel())

    def count(self, kind: int) -> int:
        """Number of blocks of one kind (``TARGET``, ``CONTEXT`` or ``TEXT``); no host synchronisation when
        :attr:`kind_counts` is set."""
        if self.kind_counts is not None:
            return self.kind_counts[kind] if 0 <= kind < len(self.kind_counts) else 0
        return int((self.kinds == kind).sum())

    def to(self, device: torch.device | str) -> "BlockLayout":
        return _blocks_on_device(self, str(device))

    def split(self, size: int) -> Tuple["BlockLayout", torch.Tensor]:
        """Split every block into sub-blocks of ``size`` tokens (the last one of a block short).

        Returns:
            ``(sub, parent)``: the sub-block :class:`BlockLayout` (``block_size = size``) and ``parent``
            [n_sub] int64, the block each sub-block belongs to. Sub-blocks of one block are contiguous and
            in order. ``size >= block_size`` returns the blocks themselves.
        """
        return _split(self, int(size))


@functools.lru_cache(maxsize=64)
def _split(blocks: BlockLayout, s: int) -> Tuple[BlockLayout, torch.Tensor]:
    cnt = blocks.counts
    n_sub = (cnt + s - 1) // s  # [nb]
    parent = torch.repeat_interleave(torch.arange(blocks.num_blocks, device=cnt.device), n_sub)
    first = torch.cumsum(n_sub, 0) - n_sub
    local = torch.arange(parent.numel(), device=cnt.device) - first[parent]  # index of the sub-block in its block
    starts = blocks.starts[parent] + local * s
    counts = torch.minimum(cnt[parent] - local * s, torch.full_like(local, s))
    token_block = torch.repeat_interleave(torch.arange(parent.numel(), device=cnt.device), counts)
    kinds = blocks.kinds[parent]
    sub = BlockLayout(block_size=s, starts=starts, counts=counts, kinds=kinds, spans=blocks.spans[parent],
                      token_block=token_block, kind_counts=None if kinds.is_cuda else _kind_counts(kinds.tolist()))
    return sub, parent


@functools.lru_cache(maxsize=64)
def _blocks_on_device(blocks: BlockLayout, device: str) -> BlockLayout:
    if str(blocks.starts.device) == device:
        return blocks
    return BlockLayout(
        blocks.block_size,
        *(t.to(device) for t in (blocks.starts, blocks.counts, blocks.kinds, blocks.spans, blocks.token_block)),
        kind_counts=blocks.kind_counts,
    )


class Layout:
    """An ordered list of typed token spans of one attention call.

    Args:
        spans: iterable of ``(kind, length)`` with ``kind`` in ``{"target", "context", "text"}`` and
            ``length`` a positive int. Any order; several context or text spans are allowed. At least
            one target span is required.

    Raises:
        ValueError: no target span, an unknown kind, or a non-positive / non-integer length.

    Example:
        >>> layout = Layout([("target", 32760), ("context", 32760)])
        >>> layout.num_tokens
        65520
        >>> layout.blocks(64).num_blocks   # 512 target blocks + 512 context blocks, none straddling
        1024
    """

    def __init__(self, spans: Iterable[Tuple[str, int]]):
        parsed = []
        for i, item in enumerate(spans):
            try:
                kind, length = item
            except (TypeError, ValueError):
                raise ValueError(f"Layout span {i} is {item!r}; expected a (kind, length) pair such as ('target', 1024)") from None
            if not isinstance(kind, str) or kind not in SPAN_KINDS:
                raise ValueError(f"Layout span {i} has kind {kind!r}; supported kinds: {sorted(SPAN_KINDS)}")
            if isinstance(length, bool) or not isinstance(length, int):
                try:
                    import numbers

                    if not isinstance(length, numbers.Integral):
                        raise TypeError
                    length = int(length)
                except TypeError:
                    raise ValueError(f"Layout span {i} ({kind!r}) has length {length!r}; lengths must be positive integers") from None
            if length <= 0:
                raise ValueError(f"Layout span {i} ({kind!r}) has length {length}; lengths must be positive (drop empty spans)")
            parsed.append((kind, int(length)))
        if not any(k == "target" for k, _ in parsed):
            raise ValueError(f"Layout {parsed!r} has no 'target' span; ISA needs the noisy target tokens to be marked")
        self._spans: Tuple[Tuple[str, int], ...] = tuple(parsed)

    # ------------------------------------------------------------------ basics
    @property
    def spans(self) -> Tuple[Tuple[str, int], ...]:
        return self._spans

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self._spans)

    def num(self, kind: str) -> int:
        """Total tokens of one kind."""
        return sum(n for k, n in self._spans if k == kind)

    def __len__(self) -> int:
        return len(self._spans)

    def __iter__(self):
        return iter(self._spans)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and other._spans == self._spans

    def __hash__(self) -> int:
        return hash(self._spans)

    def __repr__(self) -> str:
        return f"Layout({list(self._spans)!r})"

    def to_list(self):
        return [[k, n] for k, n in self._spans]

    @classmethod
    def from_list(cls, spans: Sequence) -> "Layout":
        return cls([tuple(s) for s in spans])

    def num_blocks(self, block_size: int) -> int:
        """Number of blocks when every span is blocked separately (plain Python, no tensors)."""
        return sum(-(-n // block_size) for _, n in self._spans)

    def encode(self) -> Tuple[List[int], List[int]]:
        """(span kinds as ints, span lengths): the form custom ops take."""
        return [SPAN_KINDS[k] for k, _ in self._spans], [n for _, n in self._spans]

    @classmethod
    def decode(cls, kinds: Sequence[int], lengths: Sequence[int]) -> "Layout":
        """Inverse of :meth:`encode`."""
        names = {v: k for k, v in SPAN_KINDS.items()}
        return cls([(names[int(k)], int(n)) for k, n in zip(kinds, lengths)])

    def check(self, seq_len: int) -> None:
        """Raise ``ValueError`` unless the layout covers exactly ``seq_len`` tokens."""
        if self.num_tokens != seq_len:
            raise ValueError(
                f"{self!r} covers {self.num_tokens} tokens but the attention call has sequence length {seq_len}; "
                "the span lengths must add up to the sequence length"
            )

    # ---------------------------------------------------------------- blocking
    def blocks(self, block_size: int) -> BlockLayout:
        """Block every span separately; see :class:`BlockLayout`."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive integer")
        return _make_blocks(self._spans, block_size)


@functools.lru_cache(maxsize=256)
def _make_blocks(spans: Tuple[Tuple[str, int], ...], b: int) -> BlockLayout:
    starts, counts, kinds, span_ids = [], [], [], []
    pos = 0
    for s, (kind, n) in enumerate(spans):
        for off in range(0, n, b):
            starts.append(pos + off)
            counts.append(min(b, n - off))
            kinds.append(SPAN_KINDS[kind])
            span_ids.append(s)
        pos += n
    counts_t = torch.tensor(counts, dtype=torch.int64)
    token_block = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int64), counts_t)
    return BlockLayout(
        block_size=b,
        starts=torch.tensor(starts, dtype=torch.int64),
        counts=counts_t,
        kinds=torch.tensor(kinds, dtype=torch.int64),
        spans=torch.tensor(span_ids, dtype=torch.int64),
        token_block=token_block,
        kind_counts=_kind_counts(kinds),
    )


def _kind_counts(kinds: Sequence[int]) -> Tuple[int, ...]:
    """Blocks of each kind (indexed by kind) of a host-side list of block kinds."""
    return tuple(sum(1 for k in kinds if k == kind) for kind in range(max(SPAN_KINDS.values()) + 1))
