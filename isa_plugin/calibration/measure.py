"""Calibration statistics: what ISA's ratios would cost in output error, measured against dense attention.

For one self-attention call (q, k, v [B, N, H, D] after norms and RoPE, and its :class:`Layout`),
:func:`measure_call` estimates, per head and separately for target-query and context-query outputs, the
relative L1 error of ISA against dense attention for every setting of a grid of
(sharpness metric, α_s, α_f, α_ns), without running ISA once per setting:

1. Plan once from pooled statistics (block means, pooled attention P, context saliency, sharpness of
   every query block, its rank) — cheap, O((N/b)²·D) per head.
2. Sample query blocks of each kind (default 48 per kind and head group) and a few tokens in each
   (default 16). For those rows only, compute the exact scores against every key, and per key block the
   softmax numerator Y[t, j] = Σ_{r∈j} e^{s_tr−m_t} v_r and denominator Z[t, j] (one batched matmul).
   Dense output = Σ_j Y / Σ_j Z.
3. Every ISA variant is then a 0/1 weighting of key blocks (exact, approximated by a block mean, or
   dropped): the exact branch depends on α_s only, the Taylor branch on (α_s, α_ns); their outputs for
   all variants come from one small batched matmul over the block axis. α_f and the sharpness metric do
   not need new outputs: a sampled block is exact iff its sharpness rank < ⌈α_f·Q⌉, so the error of
   every (metric, α_s, α_f, α_ns) is a mix of the per-block exact and Taylor errors.

The selections reproduce :func:`isa_plugin.kernels.reference.plan_from_pooled` exactly (same counts,
same stable tie-breaking); ``tests/calibration/test_stats.py`` checks the estimate against the reference
ISA with every block sampled.

:class:`CalibrationStats` accumulates the per-call sums on the device (a few tens of KB per layer) and
moves them to the CPU when read. Errors are ratio estimates: Σ|o−o*|₁ / Σ|o*|₁ over sampled tokens,
each token weighted by (block tokens / sampled tokens of its block).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..config import RATIO_NAMES, SHARPNESS_METRICS, validate_ratio
from ..layout import CONTEXT, TARGET, TEXT, Layout
from ..kernels.reference import pool_blocks
from ..kernels.counts import keep_count, topk_count
from ..timesteps import bucket_index, timestep_scalar
from .adaptive_measure import measure_adaptive_call, single_entry

__all__ = ["Grid", "LayerErrorStats", "CalibrationStats", "measure_call", "KINDS", "METRICS", "ADAPTIVE_MASS"]

logger = logging.getLogger(__name__)

KINDS = ("target", "context")
#: alias of :data:`isa_plugin.config.SHARPNESS_METRICS`, the metrics a grid may list
METRICS = SHARPNESS_METRICS


@dataclass(frozen=True)
class Grid:
    """The candidate settings a calibration measures (ratios sorted ascending, each in (0, 1]).

    ``mass`` and ``pseudo_block`` are the adaptive mode's candidates (``docs/ADAPTIVE.md``; with ``alpha_s``):
    empty ``mass`` (the default) measures the fixed mode only. :data:`ADAPTIVE_MASS` is a good ``mass``.
    """

    alpha_s: Tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    alpha_f: Tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)
    alpha_ns: Tuple[float, ...] = (0.03125, 0.0625, 0.125, 0.25)
    metrics: Tuple[str, ...] = SHARPNESS_METRICS
    mass: Tuple[float, ...] = ()
    pseudo_block: Tuple[int, ...] = (16, 64)

    def __post_init__(self):
        for name in RATIO_NAMES:
            values = getattr(self, name)
            if isinstance(values, (numbers.Real, str)) or (isinstance(values, torch.Tensor) and values.ndim != 1):
                raise TypeError(f"Grid.{name}={values!r} must be a list of candidate values in (0, 1]")
            values = values if isinstance(values, torch.Tensor) else list(values)
            object.__setattr__(self, name, tuple(sorted(validate_ratio(f"Grid.{name}", values))))
        for m in self.metrics:
            if m not in SHARPNESS_METRICS:
                raise ValueError(f"Grid metric {m!r} is not supported; supported: {list(SHARPNESS_METRICS)}")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        mass = list(self.mass) if not isinstance(self.mass, torch.Tensor) else self.mass
        object.__setattr__(self, "mass", tuple(sorted(validate_ratio("Grid.mass", mass))) if len(mass) else ())
        ps = tuple(self.pseudo_block)
        if self.mass and (not ps or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for x in ps)):
            raise ValueError(f"Grid.pseudo_block={ps!r} must be a non-empty list of positive integers (tokens per pseudo-key)")
        object.__setattr__(self, "pseudo_block", tuple(sorted(int(x) for x in ps)))

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(metrics, alpha_s, alpha_f, alpha_ns)."""
        return (len(self.metrics), len(self.alpha_s), len(self.alpha_f), len(self.alpha_ns))

    @property
    def adaptive_shape(self) -> Tuple[int, int, int]:
        """(alpha_s, mass, pseudo_block) of the adaptive mode; mass 0 when it is not measured."""
        return (len(self.alpha_s), len(self.mass), len(self.pseudo_block))

    def to_dict(self) -> Dict[str, Any]:
        d = {"alpha_s": list(self.alpha_s), "alpha_f": list(self.alpha_f), "alpha_ns": list(self.alpha_ns), "metrics": list(self.metrics)}
        if self.mass:  # a fixed-mode grid's record is what it was before the adaptive mode
            d.update(mass=list(self.mass), pseudo_block=list(self.pseudo_block))
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["alpha_s"]), tuple(d["alpha_f"]), tuple(d["alpha_ns"]), tuple(d["metrics"]),
                   mass=tuple(d.get("mass", ())), pseudo_block=tuple(d.get("pseudo_block", (16, 64))))


#: candidate pooled-mass thresholds of the adaptive mode for ``Grid(mass=...)``
ADAPTIVE_MASS = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


# ------------------------------------------------------------------------------------ per layer
@dataclass
class LayerErrorStats:
    """Accumulated statistics of one (layer, timestep bucket); all sums over observed calls.

    Attributes:
        num: [H, 2, M, S, F, NS] float64, Σ|o_ISA − o_dense|₁ over sampled tokens, per head, query kind
            (target, context), metric, α_s, α_f, α_ns.
        den: [H, 2] float64, Σ|o_dense|₁ over the same tokens.
        prune_num: [H, 2, S], error of context pruning alone (every query exact over KV') per α_s.
        taylor_num: [H, 2, NS], error of the Taylor branch for every query (α_s = 1) per α_ns.
        corr_sum: [H, 2, M, NS], Σ over calls of the Spearman correlation between a block's sharpness and
            its Taylor error (α_s = largest grid value); ``corr_n`` [H, 2] counts the calls.
        ctx_mass: [H], Σ over calls of the mean pooled attention mass target queries put on context blocks.
        calls: observed calls (batch entries).
        tokens: {"target", "context", "text"} token counts summed over calls (for the cost model).
        blocks: the same for block counts.
        heads, head_dim: of the layer.
        ad_num: [H, 2, S, P, PS] float64, the adaptive mode's Σ|o − o*|₁ per α_s, mass and pseudo-key size
            (None when the grid has no ``mass``); ``ad_den`` [H, 2] its Σ|o*|₁ (own token sample);
            ``ad_pairs`` [H, S, P, PS, 2, 2] Σ over calls of its (exact, pseudo) pairs, for the rows of
            non-context and of context query blocks.
    """

    num: torch.Tensor
    den: torch.Tensor
    prune_num: torch.Tensor
    taylor_num: torch.Tensor
    corr_sum: torch.Tensor
    corr_n: torch.Tensor
    ctx_mass: torch.Tensor
    calls: int = 0
    tokens: Dict[str, int] = field(default_factory=lambda: {"target": 0, "context": 0, "text": 0})
    blocks: Dict[str, int] = field(default_factory=lambda: {"target": 0, "context": 0, "text": 0})
    heads: int = 0
    head_dim: int = 0
    ad_num: Optional[torch.Tensor] = None
    ad_den: Optional[torch.Tensor] = None
    ad_pairs: Optional[torch.Tensor] = None

    _ADAPTIVE = ("ad_num", "ad_den", "ad_pairs")

    @property
    def has_adaptive(self) -> bool:
        return self.ad_num is not None and self.ad_num.shape[3] > 0

    @classmethod
    def zeros(cls, heads: int, head_dim: int, grid: Grid, device=None) -> "LayerErrorStats":
        M, S, F, NS = grid.shape
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        ad = {}
        if getattr(grid, "mass", ()):  # (fit._GridShape stands in for a grid and has none)
            S_, P, PS = grid.adaptive_shape
            ad = dict(ad_num=z(heads, 2, S_, P, PS), ad_den=z(heads, 2), ad_pairs=z(heads, S_, P, PS, 2, 2))
        return cls(num=z(heads, 2, M, S, F, NS), den=z(heads, 2), prune_num=z(heads, 2, S), taylor_num=z(heads, 2, NS),
                   corr_sum=z(heads, 2, M, NS), corr_n=z(heads, 2), ctx_mass=z(heads), heads=heads, head_dim=head_dim, **ad)

    _TENSORS = ("num", "den", "prune_num", "taylor_num", "corr_sum", "corr_n", "ctx_mass")

    def to(self, device) -> "LayerErrorStats":
        kw = {n: getattr(self, n).to(device) for n in self._TENSORS}
        kw.update({n: getattr(self, n).to(device) for n in self._ADAPTIVE if getattr(self, n) is not None})
        return LayerErrorStats(**kw, calls=self.calls, tokens=dict(self.tokens), blocks=dict(self.blocks), heads=self.heads, head_dim=self.head_dim)

    def add_(self, other: "LayerErrorStats") -> "LayerErrorStats":
        if other.num.shape != self.num.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(other.num.shape)} and {tuple(self.num.shape)} (different heads or grid)")
        for n in self._TENSORS:
            getattr(self, n).add_(getattr(other, n).to(getattr(self, n).device))
        if (self.ad_num is None) != (other.ad_num is None) or (self.ad_num is not None and self.ad_num.shape != other.ad_num.shape):
            raise ValueError("cannot merge statistics with and without (or with different) adaptive-mode measurements")
        for n in self._ADAPTIVE:
            if getattr(self, n) is not None:
                getattr(self, n).add_(getattr(other, n).to(getattr(self, n).device))
        self.calls += other.calls
        for k in self.tokens:
            self.tokens[k] += other.tokens[k]
            self.blocks[k] += other.blocks[k]
        return self

    # ----------------------------------------------------------------- derived
    def errors(self) -> torch.Tensor:
        """[2, M, S, F, NS] layer-level relative L1 (summed over heads) per query kind; NaN where unmeasured."""
        d = self.den.sum(0)
        return self.num.sum(0) / d.view(2, 1, 1, 1, 1)

    def head_errors(self) -> torch.Tensor:
        """[H, 2, M, S, F, NS] per-head relative L1."""
        return self.num / self.den.view(*self.den.shape, 1, 1, 1, 1)

    def mean_tokens(self) -> Dict[str, float]:
        c = max(self.calls, 1)
        return {k: v / c for k, v in self.tokens.items()}

    def mean_blocks(self) -> Dict[str, float]:
        c = max(self.calls, 1)
        return {k: v / c for k, v in self.blocks.items()}

    def rank_correlation(self) -> torch.Tensor:
        """[H, 2, M, NS] mean Spearman correlation between sharpness and Taylor error."""
        return self.corr_sum / self.corr_n.clamp(min=1)[..., None, None]


#: former name of :class:`LayerErrorStats`, kept so existing imports work
LayerStats = LayerErrorStats


# ------------------------------------------------------------------------------------ the measurement
@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """Let fp32 matmuls use TF32 (bf16/fp16 inputs are exact in TF32); restored on exit."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim (ties broken by position); NaN-free (0 when constant)."""
    def ranks(a):
        a = a.contiguous()
        r = torch.empty_like(a)
        r.scatter_(-1, torch.sort(a, dim=-1, stable=True).indices, torch.arange(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a))
        return r - r.mean(-1, keepdim=True)

    rx, ry = ranks(x), ranks(y)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp(min=1e-30), torch.zeros_like(den))


@torch.no_grad()
def measure_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    grid: Grid,
    *,
    block_size: int = 64,
    topk_fraction: float = 0.0625,
    blocks_per_kind: int = 48,
    tokens_per_block: int = 16,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    max_chunk_elems: int = 1 << 28,
) -> LayerErrorStats:
    """Statistics of one attention call (one batch entry): see the module docstring.

    Args:
        q, k, v: [N, H, D] or [1, N, H, D] (one batch entry), any float dtype, on any device.
        layout: the call's :class:`Layout` (covers N tokens).
        grid: the candidate ratios.
        block_size, topk_fraction: as in :class:`ISAConfig`.
        blocks_per_kind: query blocks sampled per kind (target, context); all when fewer exist.
        tokens_per_block: tokens sampled per sampled block (all when the block is shorter).
        generator: CPU generator for the sampling (reproducible calibration).
        max_chunk_elems: bound on the transient [tokens, N] score buffers (elements).

    Returns:
        A :class:`LayerErrorStats` for this call, on the inputs' device.
    """
    q, k, v, ct, sc = single_entry(q, k, v, layout, scale, "measure_call")
    N, H, D = q.shape
    dev = q.device
    M, S, F, NS = grid.shape
    out = LayerErrorStats.zeros(H, D, grid, device=dev)

    blocks_cpu = layout.blocks(block_size)
    kinds_cpu = blocks_cpu.kinds
    nb = blocks_cpu.num_blocks
    n_t, n_c, n_x = (int((kinds_cpu == kk).sum()) for kk in (TARGET, CONTEXT, TEXT))
    out.calls = 1
    for name, kk in (("target", TARGET), ("context", CONTEXT), ("text", TEXT)):
        out.tokens[name] = layout.num(name)
        out.blocks[name] = int((kinds_cpu == kk).sum())
    n_q = n_t + n_c  # non-text query blocks
    if nb < 2 or n_q == 0:
        return out
    blocks = blocks_cpu.to(dev)
    is_t, is_c, is_x = (blocks.kinds == TARGET), (blocks.kinds == CONTEXT), (blocks.kinds == TEXT)
    counts = blocks.counts.to(ct)

    with _tf32():
        # ---------------------------------------------------------------- pooled planning (all heads)
        qbar = pool_blocks(q[None], blocks)[0]  # [H, nb, D]
        kbar = pool_blocks(k[None], blocks)[0]
        vbar = pool_blocks(v[None], blocks)[0]
        logits = torch.matmul(qbar, kbar.transpose(-1, -2)) * sc  # [H, nb, nb]
        P = torch.softmax(logits, dim=-1)
        saliency = (P * is_t[None, :, None]).sum(dim=1) * is_c  # [H, nb]
        if n_c:
            out.ctx_mass += (P[:, is_t][:, :, is_c].sum(-1)).mean(-1).to(torch.float64)
        # kept context blocks per alpha_s: [S, H, nb]
        if n_c:
            sal = saliency.masked_fill(~is_c, float("-inf"))
            order = torch.sort(sal, dim=-1, descending=True, stable=True).indices
            rank_c = torch.empty_like(order)
            rank_c.scatter_(-1, order, torch.arange(nb, device=dev).expand_as(order))
            kept_n = [keep_count(a, n_c) for a in grid.alpha_s]
            keep = torch.stack([(rank_c < kn) & is_c for kn in kept_n])  # [S, H, nb]
        else:
            kept_n = [0] * S
            keep = torch.zeros(S, H, nb, dtype=torch.bool, device=dev)
        kv_keep = keep | ~is_c  # [S, H, nb]

        # sharpness per metric and the rank of every non-text query block: [M, H, nb]
        ranks = []
        sharps = []
        kt = topk_count(topk_fraction, n_t)
        for m in grid.metrics:
            if m == "topk_mass":
                sh = P[..., is_t].topk(min(kt, n_t), dim=-1).values.sum(-1) if n_t else torch.zeros(H, nb, device=dev, dtype=P.dtype)
            else:
                sh = (P * P).sum(-1)
            sharps.append(sh)
            s_masked = sh.masked_fill(is_x, float("-inf"))
            o = torch.sort(s_masked, dim=-1, descending=True, stable=True).indices
            r = torch.empty_like(o)
            r.scatter_(-1, o, torch.arange(nb, device=dev).expand_as(o))
            ranks.append(r)
        rank = torch.stack(ranks)  # [M, H, nb]
        sharp = torch.stack(sharps)
        n_exact_f = torch.tensor([keep_count(a, n_q) for a in grid.alpha_f], device=dev)  # [F]

        # ---------------------------------------------------------------- sampling (CPU generator)
        sel, sel_kind = [], []
        for kind_id, kk in ((0, TARGET), (1, CONTEXT)):
            cand = torch.nonzero(kinds_cpu == kk).flatten()
            if cand.numel() == 0:
                continue
            pick = cand[torch.randperm(cand.numel(), generator=generator)[: min(blocks_per_kind, cand.numel())]]
            sel.append(pick)
            sel_kind.append(torch.full((pick.numel(),), kind_id, dtype=torch.int64))
        sel_cpu = torch.cat(sel)
        kind_cpu = torch.cat(sel_kind)
        n_sel = sel_cpu.numel()
        m_tok = min(tokens_per_block, block_size)
        bcounts = blocks_cpu.counts[sel_cpu]  # [s]
        # a random permutation of each block's valid offsets (invalid offsets sort last), first m_tok taken
        keys = torch.rand(n_sel, block_size, generator=generator) + (torch.arange(block_size)[None, :] >= bcounts[:, None]) * 2.0
        offs = torch.argsort(keys, dim=-1)[:, :m_tok]
        tok_valid = torch.arange(m_tok)[None, :] < bcounts[:, None]
        offs = torch.where(tok_valid, offs, torch.zeros_like(offs))
        n_used = tok_valid.sum(-1).clamp(min=1)
        tok_w = (bcounts.to(torch.float64) / n_used)[:, None] * tok_valid  # [s, m]
        tok_idx = blocks_cpu.starts[sel_cpu][:, None] + offs  # [s, m]
        sel_d = sel_cpu.to(dev)
        kind_d = kind_cpu.to(dev)
        tok_idx_d = tok_idx.to(dev)
        tok_w_d = tok_w.to(dev)

        # key padding: [nb, b] token indices, invalid slots masked
        ar_b = torch.arange(block_size, device=dev)
        key_idx = blocks.starts[:, None] + ar_b[None, :]
        key_valid = ar_b[None, :] < blocks.counts[:, None]
        key_idx = torch.where(key_valid, key_idx, torch.zeros_like(key_idx))
        key_bias = torch.zeros(nb, block_size, dtype=ct, device=dev).masked_fill(~key_valid, float("-inf"))

        # Taylor candidates: non-text KV' blocks, per alpha_s; counts per (alpha_s, alpha_ns)
        cand = kv_keep & ~is_x  # [S, H, nb]
        k_prime = [n_t + kept_n[si] for si in range(S)]
        n_exact_ns = [[keep_count(a, k_prime[si]) for a in grid.alpha_ns] for si in range(S)]

        # per-sample errors for every head: exact branch [H, s, S] and Taylor branch [H, s, S, NS]
        err_exact = torch.zeros(H, n_sel, S, dtype=torch.float64, device=dev)
        err_taylor = torch.zeros(H, n_sel, S, NS, dtype=torch.float64, device=dev)
        ref_norm = torch.zeros(H, n_sel, dtype=torch.float64, device=dev)
        n_var = S * (1 + NS)
        per_block = max(1, m_tok * nb * max(block_size, D))  # transient elements per sampled block and head
        # heads in groups (fewer launches per call), sampled blocks in chunks: both bounded by max_chunk_elems
        hc = max(1, min(H, max_chunk_elems // (per_block * n_sel)))
        chunk = max(1, min(n_sel, max_chunk_elems // (per_block * hc)))

        # exact / approximated key blocks of every variant, all heads at once: [H, s, V, nb]
        # variants: S exact-branch ones (every KV' block exact), then S·NS Taylor ones (alpha_s-major)
        lg = logits[:, sel_d]  # [H, s, nb] pooled logits of the sampled query blocks
        order = torch.sort(lg, dim=-1, descending=True, stable=True).indices
        c_sorted = torch.gather(cand[:, :, None, :].expand(S, H, n_sel, nb), -1, order[None].expand(S, H, n_sel, nb))
        cum = torch.cumsum(c_sorted.to(torch.int32), dim=-1)  # [S, H, s, nb]
        thr = torch.tensor(n_exact_ns, device=dev, dtype=torch.int32)  # [S, NS]
        pick_sorted = c_sorted[:, :, :, None, :] & (cum[:, :, :, None, :] <= thr[:, None, None, :, None])  # [S, H, s, NS, nb]
        pick = torch.zeros_like(pick_sorted).scatter_(-1, order[None, :, :, None, :].expand_as(pick_sorted), pick_sorted)
        ex = pick | is_x
        ap = kv_keep[:, :, None, None, :] & ~ex
        w_ex_all = torch.cat([kv_keep[:, :, None, :].expand(S, H, n_sel, nb).permute(1, 2, 0, 3),
                              ex.permute(1, 2, 0, 3, 4).reshape(H, n_sel, S * NS, nb)], dim=2).to(ct)
        w_ap_all = torch.cat([torch.zeros(H, n_sel, S, nb, dtype=torch.bool, device=dev),
                              ap.permute(1, 2, 0, 3, 4).reshape(H, n_sel, S * NS, nb)], dim=2).to(ct)
        del pick_sorted, pick, ex, ap, c_sorted, cum

        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            g = h1 - h0
            kp = k[:, h0:h1][key_idx].permute(2, 0, 1, 3).to(ct)  # [g, nb, b, D]
            vp = v[:, h0:h1][key_idx].permute(2, 0, 1, 3).to(ct)
            kb, vb = kbar[h0:h1], vbar[h0:h1]  # [g, nb, D]
            wex_g, wap_g = w_ex_all[h0:h1], w_ap_all[h0:h1]  # [g, s, V, nb]
            for c0 in range(0, n_sel, chunk):
                c1 = min(n_sel, c0 + chunk)
                cs = c1 - c0
                T = cs * m_tok
                qs = q[tok_idx_d[c0:c1].flatten(), h0:h1].transpose(0, 1).to(ct) * sc  # [g, T, D], scale folded in
                s_tok = torch.matmul(qs, kp.reshape(g, nb * block_size, D).transpose(-1, -2)).view(g, T, nb, block_size)
                s_tok.add_(key_bias)
                mx = s_tok.amax(dim=(2, 3), keepdim=True)  # [g, T, 1, 1]
                e = s_tok.sub_(mx).exp_()  # in place: the score buffer becomes the softmax numerators
                Z = e.sum(-1)  # [g, T, nb]
                Y = torch.matmul(e.transpose(1, 2), vp)  # [g, nb, T, D]
                del e, s_tok
                o_dense = (Y.sum(1) / Z.sum(-1, keepdim=True)).view(g, cs, m_tok, D)
                Yc = Y.view(g, nb, cs, m_tok * D).transpose(1, 2)  # [g, cs, nb, m*D] (strided view, no copy)
                # approximated blocks: a[t, j] = n_j e^{q_t·k̄_j·sc − m_t}
                a = counts * torch.exp(torch.matmul(qs, kb.transpose(-1, -2)) - mx[..., 0])  # [g, T, nb]
                a = a.view(g, cs, m_tok, nb)
                Zc = Z.view(g, cs, m_tok, nb)
                wex, wap = wex_g[:, c0:c1], wap_g[:, c0:c1]  # [g, cs, V, nb]
                num = torch.matmul(wex, Yc).view(g, cs, n_var, m_tok, D)
                num = num + torch.einsum("gsvj,gsmj,gjd->gsvmd", wap, a, vb)
                den = torch.einsum("gsvj,gsmj->gsvm", wex, Zc) + torch.einsum("gsvj,gsmj->gsvm", wap, a)
                o = num / den[..., None]
                err = (o - o_dense[:, :, None]).abs().sum(-1).to(torch.float64)  # [g, cs, V, m]
                w = tok_w_d[c0:c1]  # [cs, m]
                err = (err * w[None, :, None, :]).sum(-1)  # [g, cs, V]
                ref_norm[h0:h1, c0:c1] = (o_dense.abs().sum(-1).to(torch.float64) * w).sum(-1)
                err_exact[h0:h1, c0:c1] = err[..., :S]
                err_taylor[h0:h1, c0:c1] = err[..., S:].reshape(g, cs, S, NS)
                del Y, Yc, num, o

        # ---------------------------------------------------------------- mix over alpha_f and accumulate
        r_sel = rank[:, :, sel_d]  # [M, H, s]
        exact_f = r_sel[:, :, None, :] < n_exact_f[None, None, :, None]  # [M, H, F, s]
        for kind_id in range(2):
            mk = kind_d == kind_id
            if not bool(mk.any()):
                continue
            ee = err_exact[:, mk]  # [H, s_k, S]
            et = err_taylor[:, mk]  # [H, s_k, S, NS]
            ef = exact_f[:, :, :, mk]  # [M, H, F, s_k]
            # mixed[m, h, f, s_k, S, NS]
            mixed = torch.where(ef[..., None, None], ee[None, :, None, :, :, None], et[None, :, None])
            out.num[:, kind_id] += mixed.sum(3).permute(1, 0, 3, 2, 4)  # -> [H, M, S, F, NS]
            out.den[:, kind_id] += ref_norm[:, mk].sum(-1)
            out.prune_num[:, kind_id] += ee.sum(1)
            out.taylor_num[:, kind_id] += et[:, :, -1].sum(1)
            if int(mk.sum()) >= 3:
                rel = et[:, :, -1, :] / ref_norm[:, mk, None].clamp(min=1e-30)  # [H, s_k, NS]
                sh = sharp[:, :, sel_d[mk]].to(torch.float64)  # [M, H, s_k]
                corr = _spearman(sh[:, :, None, :].expand(M, H, NS, -1), rel.permute(0, 2, 1)[None].expand(M, H, NS, -1))
                out.corr_sum[:, kind_id] += corr.permute(1, 0, 2)
                out.corr_n[:, kind_id] += 1
    return out


# ------------------------------------------------------------------------------------ accumulator
class CalibrationStats:
    """Statistics of every observed (layer, timestep bucket), plus what they were measured on.

    Args:
        grid: the candidate ratios.
        block_size, topk_fraction: ISA settings the measurement assumes.
        timestep_edges: ascending timestep boundaries splitting calls into buckets (empty: one bucket).

    Use :meth:`observe` per attention call (the recorder does), then :func:`fit_profile`.
    """

    def __init__(self, grid: Optional[Grid] = None, *, block_size: int = 64, topk_fraction: float = 0.0625,
                 timestep_edges: Sequence[float] = (), blocks_per_kind: int = 48, tokens_per_block: int = 16,
                 seed: int = 0):
        self.grid = grid or Grid()
        self.block_size = int(block_size)
        self.topk_fraction = float(topk_fraction)
        self.timestep_edges = tuple(float(e) for e in timestep_edges)
        self.blocks_per_kind = int(blocks_per_kind)
        self.tokens_per_block = int(tokens_per_block)
        self.generator = torch.Generator().manual_seed(seed)
        # the adaptive mode samples with its own generator: the fixed mode's statistics do not depend on it
        self.adaptive_generator = torch.Generator().manual_seed(seed + 1)
        if self.grid.mass:
            bad = [s for s in self.grid.pseudo_block if s > self.block_size or self.block_size % s]
            if bad:
                raise ValueError(f"Grid.pseudo_block values {bad} do not divide block_size={self.block_size}")
        self.layers: Dict[Tuple[str, int], LayerErrorStats] = {}
        #: the same statistics per calibration sample (``observe(..., sample=i)``): the held-out check's input
        self.per_sample: Dict[Tuple[str, int], Dict[int, LayerErrorStats]] = {}
        self.meta: Dict[str, Any] = {"timesteps": [], "calls": 0}
        self._timesteps = set()

    @property
    def num_buckets(self) -> int:
        return len(self.timestep_edges) + 1

    def bucket_of(self, timestep) -> int:
        """The timestep bucket of a call (:func:`isa_plugin.timesteps.bucket_index`; the same rule as the profile)."""
        return bucket_index(timestep, self.timestep_edges)

    def layer_names(self) -> List[str]:
        seen = []
        for name, _ in self.layers:
            if name not in seen:
                seen.append(name)
        return seen

    def get(self, layer: str, bucket: int = 0, sample: Optional[int] = None) -> Optional[LayerErrorStats]:
        """A layer's statistics (on the CPU) in a timestep bucket, over all samples or of one ``sample``."""
        s = self.layers.get((layer, bucket)) if sample is None else self.per_sample.get((layer, bucket), {}).get(sample)
        return None if s is None else s.to("cpu")

    def sample_ids(self, layer: str, bucket: int = 0) -> List[int]:
        """The samples that measured ``layer`` in ``bucket`` (empty when calls were observed without ``sample``)."""
        return sorted(self.per_sample.get((layer, bucket), {}))

    def observe(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, timestep=None,
                sample: Optional[int] = None) -> None:
        """Measure one attention call (every batch entry) and add it to the layer's statistics.

        Args:
            q, k, v: [B, N, H, D] after norms and RoPE.
            layout: a :class:`Layout` or a list of one per batch entry; None skips the call.
            timestep: None, a number, or a [B] or [B, S] (per-token) tensor; the call's timestep is its largest
                value (:func:`isa_plugin.timesteps.timestep_scalar`), and every batch entry goes to its bucket.
            sample: the calibration sample the call belongs to; statistics are also kept per sample, for
                :func:`~isa_plugin.calibration.fit_profile`'s held-out check.

        Raises:
            ValueError: timestep buckets are set but the call has no timestep.
        """
        if layout is None:
            logger.debug("layer %s: no layout, call not measured", layer_name)
            return
        B = q.shape[0]
        layouts = [layout] * B if isinstance(layout, Layout) else list(layout)
        t = timestep_scalar(timestep)
        bucket = self.bucket_of(t)
        if t is not None:
            self._timesteps.add(round(t, 4))
        for b in range(B):
            st = measure_call(
                q[b], k[b], v[b], layouts[b], self.grid, block_size=self.block_size, topk_fraction=self.topk_fraction,
                blocks_per_kind=self.blocks_per_kind, tokens_per_block=self.tokens_per_block, generator=self.generator,
            )
            if self.grid.mass:
                r = measure_adaptive_call(
                    q[b], k[b], v[b], layouts[b], self.grid.alpha_s, self.grid.mass, self.grid.pseudo_block,
                    block_size=self.block_size, blocks_per_kind=self.blocks_per_kind,
                    tokens_per_block=self.tokens_per_block, generator=self.adaptive_generator,
                )
                st.ad_num, st.ad_den, st.ad_pairs = r["num"], r["den"], r["pairs"]
            key = (layer_name, bucket)
            if sample is not None:
                per = self.per_sample.setdefault(key, {})
                if sample in per:
                    per[sample].add_(st)
                else:  # a copy: the pooled sum below may add into ``st``
                    per[sample] = LayerErrorStats.zeros(st.heads, st.head_dim, self.grid, device=st.num.device).add_(st)
            if key in self.layers:
                self.layers[key].add_(st)
            else:
                self.layers[key] = st
        self.meta["calls"] += B
        self.meta["timesteps"] = sorted(self._timesteps, reverse=True)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and Python values (``torch.save``-able with ``weights_only=True``)."""
        def plain(s):
            s = s.to("cpu")
            return {n: getattr(s, n) for n in LayerErrorStats._TENSORS + LayerErrorStats._ADAPTIVE if getattr(s, n) is not None} | {
                "calls": s.calls, "tokens": dict(s.tokens), "blocks": dict(s.blocks), "heads": s.heads, "head_dim": s.head_dim}

        layers = {f"{name}|{b}": plain(s) for (name, b), s in self.layers.items()}
        samples = {f"{name}|{b}|{i}": plain(s) for (name, b), per in self.per_sample.items() for i, s in per.items()}
        return {"grid": self.grid.to_dict(), "block_size": self.block_size, "topk_fraction": self.topk_fraction,
                "timestep_edges": list(self.timestep_edges), "meta": dict(self.meta), "layers": layers, "samples": samples}

    @classmethod
    def from_state_dict(cls, sd: Dict[str, Any]) -> "CalibrationStats":
        out = cls(Grid.from_dict(sd["grid"]),
                  block_size=sd["block_size"], topk_fraction=sd["topk_fraction"], timestep_edges=sd["timestep_edges"])
        out.meta = dict(sd["meta"])

        def build(d):
            return LayerErrorStats(**{n: d[n] for n in LayerErrorStats._TENSORS}, **{n: d[n] for n in LayerErrorStats._ADAPTIVE if n in d},
                                   calls=d["calls"], tokens=dict(d["tokens"]), blocks=dict(d["blocks"]), heads=d["heads"],
                                   head_dim=d["head_dim"])

        for key, d in sd["layers"].items():
            name, b = key.rsplit("|", 1)
            out.layers[(name, int(b))] = build(d)
        for key, d in sd.get("samples", {}).items():
            name, b, i = key.rsplit("|", 2)
            out.per_sample.setdefault((name, int(b)), {})[int(i)] = build(d)
        return out

