"""Synthetic attention workloads that behave like a video DiT's ICL self-attention.

i.i.d. Gaussian q/k/v make every head near-uniform and every ISA setting look equally bad (or good). Here
tokens sit on a 3D (frames × height × width) grid for the target and the context video, each segment with
its own 3D rotary embedding, and q/k/v are made from:

- a smooth content field (a few low-frequency 3D Fourier modes per channel), shared by both videos: the
  context video is the clean source, the target is the same content with a local "edit" (a blob region
  replaced by other content) plus noise that grows with the timestep — so context and target correlate;
- per head a mixture of a positional term (a constant vector rotated by RoPE: attention peaks at small
  grid offsets — a *local* head), a content term (projections of the content field: a *semantic* head),
  and a temperature (near-uniform heads have a low one);
- a segment term that makes target queries put less mass on context keys, growing with depth (ISA.md §1).

A :class:`SyntheticModel` fixes the "weights" (projections, head kinds and temperatures per layer) from a
seed; :meth:`SyntheticModel.sample` draws one "video" (a content field) from another seed. Calibrating on
some samples and checking on held-out ones is then meaningful. :func:`synthetic_qkv` is a one-call helper
for benchmarks (e.g. Wan 480p ICL: ``frames=21, height=30, width=52`` twice = 65,520 tokens).

Two named workloads (:data:`WORKLOADS`; ``SyntheticSpec.preset(name, **shape)``, ``synthetic_qkv(...,
workload=name)``):

- ``"structured"`` (the default spec): sharp local and semantic heads; the target is the source, edited,
  at the same positions (the target-to-source correspondence is the identity).
- ``"diffuse"``: broad attention, as in the heads that decide the speed-up users see. Lower temperatures
  (×0.5; context queries ×0.8 more), positional kernels about 8 tokens wide (across frames too), smoother
  content (×0.7 frequencies) compared by cosine similarity, and MOTION: frame f of the target shows the
  source's frame f panned by about 2 tokens per frame and turned by about 0.06 rad per frame
  (:meth:`SyntheticModel.source_positions`), so a target query's matching context keys sit at shifted
  positions that change with the frame. Its pooled rows are flat but not uniform (8 frames of 16 × 16,
  4 heads, 3 layers, b = 64, per layer: normalised entropy 0.86–0.96 for target and 0.96–0.98 for context
  query blocks against 0.69–0.77 / 0.69–0.83 structured; top-10% block mass 0.20–0.38 / 0.16–0.22 against
  0.49–0.62 / 0.41–0.63; uniform rows would give 1 and 0.10).

Both at N = 4,096 (``benchmarks/bench_workloads.py``: 4 heads, D = 64, 3 layers, CPU float32, calibration
samples 0, 1, held-out 100, 101, budget 0.05; cost = (exact + pseudo pairs) / N² on the held-out samples):
the fixed mode's profile costs 0.415 of dense on the structured workload and 0.546 on the diffuse one; with
the adaptive mode offered too (the former 9-mass grid), 0.322 (0.78× fixed) and 0.485 (0.89×), and 0.328 and
0.435 with a 48-mass grid and the margin bisection, and 0.286 and 0.125 with the package's grid now (k-means
pseudo-keys, masses down to 0.05; ``benchmarks/bench_levers.py``); every held-out error stays within 0.05. Another model seed and N = 8,192 give the same picture for the fixed mode
(diffuse 1.3–1.9× structured) and 0.75× / 0.74× for the adaptive mode on the diffuse workload:
``docs/ADAPTIVE.md`` § Workloads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..layout import Layout

__all__ = ["SyntheticSpec", "SyntheticModel", "WORKLOADS", "synthetic_qkv", "calibrate_synthetic", "evaluate_synthetic",
           "pooled_attention", "HEAD_KINDS", "CONTENT_MATCHES"]

HEAD_KINDS = ("local", "semantic", "uniform", "mixed")
#: values of :attr:`SyntheticSpec.content_match`
CONTENT_MATCHES = ("bilinear", "cosine")


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and character of a synthetic ICL attention model.

    The fields after ``rope_theta`` shape how diffuse the attention is and how the target moves against the
    source; their defaults are the structured workload (bit for bit what it was before they existed).
    :data:`WORKLOADS` holds the named presets.

    Args:
        frames, height, width: latent token grid of each video (target and context alike).
        heads, head_dim, layers: attention shape.
        channels: content channels; modes: Fourier modes per channel of the content field.
        head_mix: relative frequency of head kinds (local, semantic, uniform, mixed).
        context_first: put the context span before the target span.
        text_tokens: a text span (joint attention models) after the videos; 0 for none.
        rope_theta: RoPE base (Wan: 10000).
        temperature: multiplies every head's temperature (< 1: flatter rows). > 0.
        context_temperature: multiplies the context queries' logits once more (the segment term excepted):
            < 1 spreads the context queries' attention. > 0.
        kernel_width: width in tokens (and frames) of the positional heads' kernel: the positional energy of
            each RoPE pair is weighted by exp(-(ω·w)²/2) for its rotation ω per token, so attention falls off
            over about w tokens instead of 1–2. 0: the structured weighting (pairs that rotate within the grid).
        content_match: how a head's content term compares a query's content with a key's: ``"bilinear"``
            (independent q and k projections plus a shared one: a generic bilinear form, the structured
            workload) or ``"cosine"`` (unit-norm content and one shared q/k projection with orthonormal rows,
            so the content term peaks at keys with the query's own content — wherever motion moved it).
        content_frequency: multiplies the content field's frequencies (< 1: smoother content, broader
            semantic matches). > 0.
        motion: pan speed of the target against the source, tokens per frame (see
            :meth:`SyntheticModel.source_positions`); 0: none. ≥ 0.
        rotation: turn of the target against the source, radians per frame; 0: none. ≥ 0.

    Raises:
        ValueError: a temperature, ``content_frequency`` not > 0, a negative ``kernel_width``, ``motion`` or
            ``rotation``, or an unknown ``content_match``.

    Example:
        >>> spec = SyntheticSpec.preset("diffuse", frames=8, heads=4)
        >>> spec.motion, spec.frames
        (2.0, 8)
    """

    frames: int = 4
    height: int = 16
    width: int = 16
    heads: int = 8
    head_dim: int = 64
    layers: int = 4
    channels: int = 24
    modes: int = 6
    head_mix: Tuple[float, float, float, float] = (0.35, 0.3, 0.12, 0.23)
    context_first: bool = False
    text_tokens: int = 0
    rope_theta: float = 10000.0
    temperature: float = 1.0
    context_temperature: float = 1.0
    kernel_width: float = 0.0
    content_match: str = "bilinear"
    content_frequency: float = 1.0
    motion: float = 0.0
    rotation: float = 0.0

    def __post_init__(self):
        for name in ("temperature", "context_temperature", "content_frequency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SyntheticSpec.{name}={getattr(self, name)!r} must be > 0 (1 leaves the workload as is)")
        for name in ("kernel_width", "motion", "rotation"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SyntheticSpec.{name}={getattr(self, name)!r} must be >= 0 (0 turns it off)")
        if self.content_match not in CONTENT_MATCHES:
            raise ValueError(f"SyntheticSpec.content_match={self.content_match!r} is not supported; use one of "
                             f"{list(CONTENT_MATCHES)}")

    @classmethod
    def preset(cls, name: str, **fields) -> "SyntheticSpec":
        """The named workload of :data:`WORKLOADS` with some fields replaced (shape, usually).

        Args:
            name: ``"structured"`` or ``"diffuse"``.
            **fields: :class:`SyntheticSpec` fields to replace, e.g. ``frames=8, heads=4``.

        Returns:
            A :class:`SyntheticSpec`.

        Raises:
            ValueError: an unknown workload name. TypeError: an unknown field.

        Example:
            >>> SyntheticSpec.preset("structured", frames=8) == SyntheticSpec(frames=8)
            True
        """
        if name not in WORKLOADS:
            raise ValueError(f"unknown synthetic workload {name!r}; choose one of {list(WORKLOADS)}")
        return replace(WORKLOADS[name], **fields)

    @property
    def tokens_per_video(self) -> int:
        return self.frames * self.height * self.width

    def layout(self) -> Layout:
        t = ("target", self.tokens_per_video)
        c = ("context", self.tokens_per_video)
        spans = [c, t] if self.context_first else [t, c]
        if self.text_tokens:
            spans.append(("text", self.text_tokens))
        return Layout(spans)


#: the named workloads (module docstring): presets whose shape fields callers replace, with
#: :meth:`SyntheticSpec.preset` or :func:`dataclasses.replace`
WORKLOADS: Dict[str, SyntheticSpec] = {
    "structured": SyntheticSpec(),
    "diffuse": SyntheticSpec(temperature=0.5, context_temperature=0.8, kernel_width=8.0, content_match="cosine",
                             content_frequency=0.7, motion=2.0, rotation=0.06),
}


def pooled_attention(q: torch.Tensor, k: torch.Tensor, layout: Layout, block_size: int = 64) -> torch.Tensor:
    """ISA's pooled attention over block means, with the count bias: softmax_j(q̄_i·k̄_j/√D + ln n_j), float64.

    What both selection modes rank key blocks by (``docs/ADAPTIVE.md`` step 3, before context pre-selection);
    used to measure how sharp or diffuse a workload is.

    Args:
        q, k: [B, N, H, D]. layout: the :class:`~isa_plugin.layout.Layout` of the N tokens.
        block_size: b, tokens per block (blocks never straddle spans).

    Returns:
        [B, H, nb, nb] float64, rows summing to 1 (row i: query block i, column j: key block j).

    Example:
        >>> q, k, v, layout = synthetic_qkv(4, 16, 16, 4, 64, dtype=torch.float32, workload="diffuse")
        >>> pooled_attention(q, k, layout).shape
        torch.Size([1, 4, 32, 32])
    """
    blocks = layout.blocks(block_size)
    B, N, H, D = q.shape
    tb, counts = blocks.token_block.to(q.device), blocks.counts.to(q.device, torch.float64)

    def means(x):
        out = torch.zeros(B, blocks.num_blocks, H, D, dtype=torch.float64, device=x.device)
        return (out.index_add_(1, tb, x.to(torch.float64)) / counts[None, :, None, None]).transpose(1, 2)

    logits = means(q) @ means(k).transpose(-1, -2) / math.sqrt(D) + counts.log()
    return torch.softmax(logits, -1)


def _grid_positions(f: int, h: int, w: int, device) -> torch.Tensor:
    ff, hh, ww = torch.meshgrid(torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ff, hh, ww], -1).reshape(-1, 3).to(torch.float32)  # [n, 3]


def _rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[n, head_dim/2] rotation angles; the pairs are split over (t, h, w) like Wan's 3D RoPE."""
    half = head_dim // 2
    parts = [half - 2 * (half // 3), half // 3, half // 3]
    angs = []
    for axis, d in enumerate(parts):
        freqs = theta ** (-torch.arange(d, device=pos.device, dtype=torch.float32) / max(d, 1))
        angs.append(pos[:, axis : axis + 1] * freqs[None, :])
    return torch.cat(angs, -1)


def _rotate(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: x [n, H, D] with angles [n, D/2] (pairs (2i, 2i+1))."""
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class SyntheticModel:
    """Fixed per-layer, per-head "weights" of a synthetic ICL attention; samples are videos.

    Args:
        spec: the :class:`SyntheticSpec`.
        seed: the model seed (projections, head kinds, temperatures).

    Example:
        >>> model = SyntheticModel(SyntheticSpec(), seed=0)
        >>> q, k, v, layout = model.sample(layer=2, sample_seed=7)   # q: [1, 2048, 8, 64]
    """

    def __init__(self, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0):
        self.spec = spec
        self.seed = int(seed)
        g = torch.Generator().manual_seed(10_007 * self.seed + 1)
        H, D, C, L = spec.heads, spec.head_dim, spec.channels, spec.layers
        mix = torch.tensor(spec.head_mix, dtype=torch.float64)
        self.head_kinds: List[List[str]] = []
        self.params: List[Dict[str, torch.Tensor]] = []
        for layer in range(L):
            depth = layer / max(L - 1, 1)
            kinds = torch.multinomial(mix, H, replacement=True, generator=g).tolist()
            names = [HEAD_KINDS[i] for i in kinds]
            w_pos = torch.tensor([{"local": 1.0, "semantic": 0.25, "uniform": 0.3, "mixed": 0.7}[n] for n in names])
            w_sem = torch.tensor([{"local": 0.35, "semantic": 1.0, "uniform": 0.3, "mixed": 0.8}[n] for n in names])
            temp = torch.tensor([{"local": 2.6, "semantic": 2.2, "uniform": 0.6, "mixed": 1.8}[n] for n in names])
            temp = temp * torch.exp(0.15 * torch.randn(H, generator=g))
            if spec.temperature != 1.0:
                temp = temp * spec.temperature
            self.head_kinds.append(names)
            self.params.append({
                "wq": torch.randn(H, C, D, generator=g) / math.sqrt(C),
                "wk": torch.randn(H, C, D, generator=g) / math.sqrt(C),
                "wv": torch.randn(H, C, D, generator=g) / math.sqrt(C),
                "wqk": torch.randn(H, C, D, generator=g) / math.sqrt(C),  # shared q/k part: self-similar content
                "cpos": torch.randn(H, D, generator=g),
                "vbias": 0.7 * torch.randn(H, D, generator=g),  # values have a mean (projection bias, DC content)
                "w_pos": w_pos,
                "w_sem": w_sem,
                "temp": temp,
                # target queries -> context keys penalty grows with depth (context gets less mass)
                "beta": (0.5 + 2.5 * depth) * torch.exp(0.2 * torch.randn(H, generator=g)),
                "beta_ctx": 0.3 * torch.ones(H),
            })

    @property
    def layer_names(self) -> List[str]:
        return [f"blocks.{i}.attn1" for i in range(self.spec.layers)]

    # ------------------------------------------------------------------ content
    def content(self, sample_seed: int, device=None, noise: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Content features of one sample: (target [n, C], context [n, C], text [n_text, C]).

        The context is the content field on the grid; the target is the field at
        :meth:`source_positions` (the grid itself without motion), edited in a blob and noised (``noise``).
        """
        s = self.spec
        g = torch.Generator().manual_seed(7919 * int(sample_seed) + 13)
        C, K = s.channels, s.modes
        pos = _grid_positions(s.frames, s.height, s.width, device)
        size = torch.tensor([s.frames, s.height, s.width], dtype=torch.float32, device=device)
        freqs = (torch.rand(C, K, 3, generator=g) * torch.tensor([0.8, 2.5, 2.5])).to(device)  # cycles per video
        if s.content_frequency != 1.0:
            freqs = freqs * s.content_frequency
        phase = (torch.rand(C, K, generator=g) * 2 * math.pi).to(device)
        amp = (torch.randn(C, K, generator=g) / math.sqrt(K)).to(device)
        # motion: a global drift over frames
        drift = (torch.randn(2, generator=g) * 1.5).to(device)

        def field(at):
            p = at.clone()
            p[:, 1] += drift[0] * at[:, 0]
            p[:, 2] += drift[1] * at[:, 0]
            arg = 2 * math.pi * torch.einsum("nd,ckd->nck", p / size, freqs) + phase
            return (torch.cos(arg) * amp).sum(-1)  # [n, C]

        ctx = field(pos)
        mean, std = ctx.mean(0), ctx.std(0).clamp(min=1e-6)
        ctx = (ctx - mean) / std
        src = ctx if not (s.motion or s.rotation) else (field(self.source_positions(sample_seed, device)) - mean) / std
        if s.content_match == "cosine":  # every token's content has the same norm
            ctx, src = (x * (math.sqrt(C) / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)) for x in (ctx, src))
        # the edit: a blob whose content is replaced by another field
        centre = torch.rand(3, generator=g).to(device) * size
        radius = (0.25 + 0.2 * torch.rand(1, generator=g)).to(device) * size[1:].min()
        d2 = ((pos[:, 1:] - centre[1:]) ** 2).sum(-1)
        blob = torch.exp(-d2 / (2 * radius**2))[:, None]
        other = torch.randn(C, C, generator=g).to(device) / math.sqrt(C)
        tgt = (1 - blob) * src + blob * (src @ other)
        tgt = tgt + noise * torch.randn(tgt.shape, generator=g).to(device)
        txt = torch.randn(s.text_tokens, C, generator=g).to(device)
        return tgt, ctx, txt

    def source_positions(self, sample_seed: int, device=None) -> torch.Tensor:
        """Where each target token's content sits in the context video (the motion field of one sample).

        Without ``spec.motion`` and ``spec.rotation`` this is the identity. With them, target token (f, y, x)
        shows the content of context position R(θ_f)·((y, x) − c) + c − d_f in frame f (c: the frame centre;
        θ_0 = 0, d_0 = 0): d_f is a pan whose per-frame step is ``motion`` tokens in a heading drawn per
        sample, wobbling from frame to frame (±35%), and θ_f a turn of about ``rotation`` radians per frame,
        its sense drawn per sample. Positions may fall outside the grid (content panned in from outside).

        Args:
            sample_seed: the sample (as for :meth:`sample`).
            device: where to build the result.

        Returns:
            [n, 3] float32 (frame, row, column) per target token, n = frames·height·width, in the target's
            token order.

        Example:
            >>> model = SyntheticModel(SyntheticSpec.preset("diffuse"), seed=0)
            >>> src = model.source_positions(3)   # [1024, 3]; frame 0 (src[:256]) is not moved
        """
        s = self.spec
        pos = _grid_positions(s.frames, s.height, s.width, device)
        if not (s.motion or s.rotation):
            return pos
        g = torch.Generator().manual_seed(7919 * int(sample_seed) + 29)
        F = s.frames
        heading = torch.rand(1, generator=g) * 2 * math.pi
        velocity = torch.cat([heading.cos(), heading.sin()])[None] + 0.35 * torch.randn(F, 2, generator=g)
        velocity[0] = 0.0
        d = s.motion * torch.cumsum(velocity, 0)  # [F, 2] shift of frame f
        sign = 1.0 if float(torch.rand(1, generator=g)) < 0.5 else -1.0
        theta = sign * s.rotation * torch.arange(F, dtype=torch.float32) * (1 + 0.3 * torch.randn(F, generator=g))
        theta[0] = 0.0
        f = pos[:, 0].long()
        d, theta = d.to(pos.device)[f], theta.to(pos.device)[f]
        centre = torch.tensor([(s.height - 1) / 2, (s.width - 1) / 2], device=pos.device)
        rel = pos[:, 1:] - centre
        cos, sin = theta.cos(), theta.sin()
        out = pos.clone()
        out[:, 1] = cos * rel[:, 0] - sin * rel[:, 1] + centre[0] - d[:, 0]
        out[:, 2] = sin * rel[:, 0] + cos * rel[:, 1] + centre[1] - d[:, 1]
        return out

    # ------------------------------------------------------------------ q, k, v
    def sample(self, layer: int, sample_seed: int, *, device=None, dtype=torch.float32, noise: float = 0.3
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Layout]:
        """q, k, v [1, N, H, D] and the :class:`Layout` of one layer on one sample."""
        s = self.spec
        prm = {k: v.to(device) for k, v in self.params[layer].items()}
        w_text = (prm["wq"], prm["wk"], prm["wv"])
        D = s.head_dim
        tgt, ctx, txt = self.content(sample_seed, device=device, noise=noise)
        pos = _grid_positions(s.frames, s.height, s.width, device)
        ang = _rope_angles(pos, D, s.rope_theta)
        # positional energy sits in the pairs that rotate within the grid (as trained q/k put it there)
        omega = ang[1:].abs().amax(0) if ang.shape[0] > 1 else torch.ones(D // 2, device=device)
        pw = torch.minimum(omega, torch.ones_like(omega)).clamp(min=0.02).sqrt()
        if s.kernel_width:
            rate = _rope_angles(torch.ones(1, 3, device=device), D, s.rope_theta)[0]  # radians per token
            pw = pw * torch.exp(-(rate * s.kernel_width) ** 2 / 4)
        pw = (pw / pw.square().mean().sqrt()).repeat_interleave(2)  # [D], mean square 1
        prm["cpos"] = prm["cpos"] * pw[None, :]
        if s.content_match == "cosine":  # one shared q/k projection with orthonormal rows: q·k ∝ cosine similarity
            basis, _ = torch.linalg.qr(prm["wqk"].transpose(1, 2))  # [H, D, C]
            prm["wqk"] = basis.transpose(1, 2) * math.sqrt(D / s.channels)
            prm["wq"], prm["wk"] = torch.zeros_like(prm["wq"]), torch.zeros_like(prm["wk"])

        def project(feat, seg):
            fq = torch.einsum("nc,hcd->nhd", feat, prm["wq"]) * 0.6 + torch.einsum("nc,hcd->nhd", feat, prm["wqk"])
            fk = torch.einsum("nc,hcd->nhd", feat, prm["wk"]) * 0.6 + torch.einsum("nc,hcd->nhd", feat, prm["wqk"])
            fv = torch.einsum("nc,hcd->nhd", feat, prm["wv"]) + prm["vbias"][None]
            base = prm["cpos"][None] * prm["w_pos"][None, :, None]
            qq = base + fq * prm["w_sem"][None, :, None]
            kk = base + fk * prm["w_sem"][None, :, None]
            return qq, kk, fv

        qt, kt, vt = project(tgt, "target")
        qc, kc, vc = project(ctx, "context")
        # each segment gets its own 3D RoPE, positions starting at 0
        qt, kt, qc, kc = (_rotate(x, ang) for x in (qt, kt, qc, kc))
        # segment terms on the last two (unrotated) dims: target queries are pushed away from context keys
        # (logit -beta·temp) and context queries a little away from target keys
        root = math.sqrt(D)
        qt[..., -2], qt[..., -1], qc[..., -2], qc[..., -1] = root, 0.0, 0.0, root
        kt[..., -2], kt[..., -1] = 0.0, -prm["beta_ctx"]
        kc[..., -2], kc[..., -1] = -prm["beta"], 0.0
        temp = prm["temp"][None, :, None]
        if s.context_temperature != 1.0:
            qc[..., :-2] *= s.context_temperature
        # the segment logits (-beta, -beta_ctx) do not scale with the head's temperature
        for x in (qt, qc):
            x[..., -2:] /= temp[..., 0:1]
        parts_q, parts_k, parts_v = [qt, qc], [kt, kc], [vt, vc]
        if s.context_first:
            parts_q, parts_k, parts_v = parts_q[::-1], parts_k[::-1], parts_v[::-1]
        if s.text_tokens:
            parts_q.append(torch.einsum("nc,hcd->nhd", txt, w_text[0]))
            parts_k.append(torch.einsum("nc,hcd->nhd", txt, w_text[1]))
            parts_v.append(torch.einsum("nc,hcd->nhd", txt, w_text[2]))
        q = torch.cat(parts_q) * temp
        k = torch.cat(parts_k)
        v = torch.cat(parts_v)
        return q[None].to(dtype), k[None].to(dtype), v[None].to(dtype), s.layout()


def synthetic_qkv(frames: int, height: int, width: int, heads: int, head_dim: int = 128, *, layer_depth: float = 0.5,
                  seed: int = 0, sample_seed: int = 0, device=None, dtype=torch.bfloat16, noise: float = 0.3,
                  context_first: bool = False, batch: int = 1, workload: str = "structured"
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Layout]:
    """q, k, v [1, N, H, D] of one synthetic ICL attention call (N = 2·frames·height·width).

    Args:
        frames, height, width: latent token grid per video (Wan 480p 81 frames: 21, 30, 52).
        heads, head_dim: attention shape.
        layer_depth: 0 (first layer) .. 1 (last): how strongly target queries avoid context keys.
        seed, sample_seed: model and sample seeds.
        batch: batch entries (samples ``sample_seed``, ``sample_seed + 1``, ...).
        workload: a name in :data:`WORKLOADS` (``"structured"``, ``"diffuse"``).

    Returns:
        ``(q, k, v, layout)`` with the layout ``[target, context]`` (or reversed with ``context_first``).

    Raises:
        ValueError: an unknown ``workload``.

    Example:
        >>> q, k, v, layout = synthetic_qkv(21, 30, 52, 40, device="cuda")   # 65,520 tokens
        >>> q, k, v, layout = synthetic_qkv(21, 30, 52, 40, device="cuda", workload="diffuse")
    """
    spec = SyntheticSpec.preset(workload, frames=frames, height=height, width=width, heads=heads, head_dim=head_dim,
                                layers=11, context_first=context_first)
    model = SyntheticModel(spec, seed)
    layer = int(round(min(max(layer_depth, 0.0), 1.0) * (spec.layers - 1)))
    parts = [model.sample(layer, sample_seed + i, device=device, dtype=dtype, noise=noise) for i in range(batch)]
    if batch == 1:
        return parts[0]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), parts[0][3])


def calibrate_synthetic(model: SyntheticModel, sample_seeds: Sequence[int], *, grid=None, block_size: int = 64,
                        blocks_per_kind: int = 48, tokens_per_block: int = 16, seed: int = 0, device=None,
                        dtype=torch.float32):
    """:class:`~isa_plugin.calibration.statistics.CalibrationStats` of every layer of ``model`` over ``sample_seeds``."""
    from .statistics import CalibrationStats

    stats = CalibrationStats(grid, block_size=block_size, blocks_per_kind=blocks_per_kind, tokens_per_block=tokens_per_block, seed=seed)
    for s in sample_seeds:
        for layer, name in enumerate(model.layer_names):
            q, k, v, layout = model.sample(layer, s, device=device, dtype=dtype)
            stats.observe(name, q, k, v, layout, sample=s)
    return stats


def evaluate_synthetic(model: SyntheticModel, profile_or_config, sample_seeds: Sequence[int], *, device=None,
                       dtype=torch.float32, layers: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Measured ISA error (full reference ISA against dense) and relative cost per layer on ``sample_seeds``.

    Args:
        profile_or_config: a :class:`~isa_plugin.ThresholdProfile` (its per-layer configs) or one
            :class:`~isa_plugin.ISAConfig` for every layer.

    Returns:
        ``{layer: {"error_target", "error_context", "relative_cost"}}``: relative L1 over all target / context
        query outputs of all samples, and the mean :meth:`BlockPlan.relative_cost <isa_plugin.plan.BlockPlan.relative_cost>` (1 for dense layers).
    """
    from ..config import ISAConfig
    from ..executors.reference import isa_attention_reference
    from ..kernels.reference import dense_attention_reference

    out = {}
    for layer, name in enumerate(model.layer_names):
        if layers is not None and name not in layers:
            continue
        cfg = profile_or_config if isinstance(profile_or_config, ISAConfig) else profile_or_config.config_for(name)
        num = {"target": 0.0, "context": 0.0}
        den = {"target": 0.0, "context": 0.0}
        costs = []
        for s in sample_seeds:
            q, k, v, layout = model.sample(layer, s, device=device, dtype=dtype)
            dense = dense_attention_reference(q, k, v)
            if cfg is None:
                o, cost = dense, 1.0
            else:
                o, plan = isa_attention_reference(q, k, v, layout, cfg.replace(backend="reference"), return_plan=True)
                cost = plan.relative_cost()
            costs.append(cost)
            kinds = layout.blocks(64).kinds[layout.blocks(64).token_block]
            for kind, kid in (("target", 0), ("context", 1)):
                sel = (kinds == kid).to(q.device)
                num[kind] += float((o - dense)[0, sel].abs().sum())
                den[kind] += float(dense[0, sel].abs().sum())
        out[name] = {"error_target": num["target"] / max(den["target"], 1e-30),
                     "error_context": num["context"] / max(den["context"], 1e-30),
                     "relative_cost": sum(costs) / len(costs)}
    return out
