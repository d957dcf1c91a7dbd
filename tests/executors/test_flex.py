"""ISA's adaptive mode (docs/ADAPTIVE.md): the reference against a loop restatement, anchors, pair counts,
and the FlexAttention path (eager on CPU) against the reference."""

import math

import pytest
import torch

from isa_plugin.config import ISAConfig
from isa_plugin.executors.flex import flex_attention_call
from isa_plugin.executors.reference import isa_attention_reference, plan_reference
from isa_plugin.kernels.flex import build_flex_inputs
from isa_plugin.kernels.pseudo import KMEANS_ITERS
from isa_plugin.kernels.reference import dense_attention_reference, execute_plan_reference
from isa_plugin.layout import Layout
from isa_plugin.plan import BlockPlan
from isa_plugin.selection.adaptive import AdaptiveSettings
from naive_isa import naive_pair_counts


def AdaptiveConfig(alpha_s=1.0, **kw):
    """An adaptive-mode config with the defaults the adaptive tests were written for (no context pruning)."""
    return ISAConfig(mode="adaptive", alpha_s=alpha_s, **kw)


def adaptive_attention_flex(q, k, v, layout, config, return_plan=False):
    return flex_attention_call(q, k, v, layout, config, 1 / math.sqrt(q.shape[-1]), return_plan=return_plan)

LAYOUTS = [
    Layout([("target", 70), ("context", 58)]),
    Layout([("context", 33), ("target", 47), ("text", 9), ("context", 1), ("context", 20)]),
    Layout([("text", 5), ("target", 1), ("target", 40), ("context", 40)]),
]


def _qkv(layout, rng, B=2, H=3, D=8, dtype=torch.float64, sharp=2.0):
    N = layout.num_tokens
    q, k, v = (torch.randn(B, N, H, D, generator=rng, dtype=torch.float64) for _ in range(3))
    # a common direction per head so that pooled rows are not flat
    bias = torch.randn(1, 1, H, D, generator=rng, dtype=torch.float64)
    return (sharp * (q + bias)).to(dtype), (k + bias).to(dtype), v.to(dtype)


# ------------------------------------------------------------------ an independent restatement with loops
def _spans_blocks(layout, b):
    out, pos = [], 0
    for kind, n in layout:
        for off in range(0, n, b):
            out.append((kind, pos + off, min(b, n - off)))
        pos += n
    return out


def _loop_kmeans(K, V, s, b):
    """The k-means pseudo-keys of one block's keys K [n, D] restated with loops: b / s slots starting as tokens
    [c·s, (c+1)·s), KMEANS_ITERS Lloyd steps among the slots non-empty before the step (nearest by squared
    distance, ties to the lower slot); (centroid, mean value, count) of every non-empty slot."""
    C, n = b // s, K.shape[0]
    slot = [u // s for u in range(n)]
    cent = {c: K[[u for u in range(n) if slot[u] == c]].mean(0) for c in set(slot)}
    for _ in range(KMEANS_ITERS):
        live = sorted(cent)
        slot = [min(live, key=lambda c: (float(((K[u] - cent[c]) ** 2).sum()), c)) for u in range(n)]
        cent = {c: K[[u for u in range(n) if slot[u] == c]].mean(0) for c in set(slot)}
    assert max(slot) < C
    return [(cent[c], V[[u for u in range(n) if slot[u] == c]].mean(0), slot.count(c)) for c in sorted(cent)]


def _loop_adaptive(q, k, v, layout, st: ISAConfig):
    """docs/ADAPTIVE.md restated with Python loops over batch, head and blocks (float64)."""
    B, N, H, D = q.shape
    sc = 1 / math.sqrt(D)
    bl = _spans_blocks(layout, st.block_size)
    nb = len(bl)
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    per = st.per_head(H)
    for b in range(B):
        for h in range(H):
            Q, K, V = q[b, :, h], k[b, :, h], v[b, :, h]
            qm = [Q[s0:s0 + n].mean(0) for _, s0, n in bl]
            km = [K[s0:s0 + n].mean(0) for _, s0, n in bl]
            # context pre-selection: pooled softmax rows of target query blocks, no count bias
            sal = [0.0] * nb
            for i in range(nb):
                if bl[i][0] != "target":
                    continue
                row = torch.softmax(torch.stack([qm[i] @ km[j] * sc for j in range(nb)]), 0)
                for j in range(nb):
                    if bl[j][0] == "context":
                        sal[j] += float(row[j])
            ctx = [j for j in range(nb) if bl[j][0] == "context"]
            n_keep = min(max(math.ceil(float(per["alpha_s"][h]) * len(ctx) - 1e-9), 1), len(ctx)) if ctx else 0
            kept = set(sorted(ctx, key=lambda j: (-sal[j], j))[:n_keep])
            kv = [j for j in range(nb) if bl[j][0] != "context" or j in kept]
            cands = [j for j in kv if bl[j][0] != "text"]
            texts = [j for j in kv if bl[j][0] == "text"]
            lo, hi = int(per["min_blocks"][h]), int(per["max_blocks"][h])
            for i in range(nb):
                w = {j: bl[j][2] * math.exp(float(qm[i] @ km[j]) * sc) for j in kv}
                tot = sum(w.values())
                m = {j: w[j] / tot for j in kv}
                p = float(per["context_mass" if bl[i][0] == "context" else "mass"][h])
                if bl[i][0] == "text":
                    chosen = list(cands)
                else:
                    ordered = sorted(cands, key=lambda j: (-m[j], j))
                    if p >= 1:
                        kstar = len(ordered)
                    else:
                        acc, kstar = sum(m[j] for j in texts), 0
                        while kstar < len(ordered) and acc < p:
                            acc += m[ordered[kstar]]
                            kstar += 1
                    kk = max(kstar, min(lo, len(ordered)))
                    kk = min(kk, min(hi, len(ordered)) if hi > 0 else len(ordered))
                    chosen = ordered[:kk]
                exact = set(chosen) | set(texts)
                keys, vals, bias = [], [], []
                for j in kv:
                    _, s0, n = bl[j]
                    if j in exact:
                        keys.append(K[s0:s0 + n]), vals.append(V[s0:s0 + n]), bias.append(torch.zeros(n, dtype=torch.float64))
                    elif st.pseudo_keys == "kmeans":
                        for cent, val, c in _loop_kmeans(K[s0:s0 + n], V[s0:s0 + n], st.pseudo_block, st.block_size):
                            keys.append(cent[None]), vals.append(val[None])
                            bias.append(torch.full((1,), math.log(c), dtype=torch.float64))
                    else:
                        for u in range(0, n, st.pseudo_block):
                            c = min(st.pseudo_block, n - u)
                            keys.append(K[s0 + u:s0 + u + c].mean(0, keepdim=True))
                            vals.append(V[s0 + u:s0 + u + c].mean(0, keepdim=True))
                            bias.append(torch.full((1,), math.log(c), dtype=torch.float64))
                Kc, Vc, bc = torch.cat(keys), torch.cat(vals), torch.cat(bias)
                _, s0, n = bl[i]
                s = Q[s0:s0 + n] @ Kc.T * sc + bc
                out[b, s0:s0 + n, h] = torch.softmax(s, -1) @ Vc
    return out


SETTINGS = [
    AdaptiveConfig(mass=0.6, block_size=8, pseudo_block=2),
    AdaptiveConfig(mass=(0.3, 0.8, 0.95), min_blocks=(1, 2, 1), max_blocks=(3, 0, 2), block_size=8, pseudo_block=4,
                   alpha_s=(0.5, 1.0, 0.25)),
    AdaptiveConfig(mass=0.9, block_size=16, pseudo_block=16, alpha_s=0.34),
    AdaptiveConfig(mass=0.75, block_size=6, pseudo_block=3, min_blocks=2),
    AdaptiveConfig(mass=(0.9, 0.7, 1.0), context_mass=(0.5, 1.0, 0.8), block_size=8, pseudo_block=4, alpha_s=0.5),
    AdaptiveConfig(mass=0.5, block_size=8, pseudo_block=2, pseudo_keys="kmeans"),
    AdaptiveConfig(mass=(0.3, 0.8, 0.95), block_size=6, pseudo_block=3, pseudo_keys="kmeans", alpha_s=0.5),
]

# every layout and every setting at least once, without the full product (test time)
CASES = [(0, 0), (1, 1), (2, 2), (1, 3), (0, 1), (1, 4), (0, 5), (1, 6), (2, 5)]


@pytest.mark.parametrize("li, si", CASES)
def test_reference_matches_loop_restatement(li, si, rng):
    layout, st = LAYOUTS[li], SETTINGS[si]
    q, k, v = _qkv(layout, rng)
    out = isa_attention_reference(q, k, v, layout, st)
    want = _loop_adaptive(q, k, v, layout, st)
    assert (out - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("li", range(len(LAYOUTS)))
def test_anchors_dense_and_kv_prime(li, rng):
    layout = LAYOUTS[li]
    q, k, v = _qkv(layout, rng)
    dense = dense_attention_reference(q, k, v)
    for st in (AdaptiveConfig(mass=1.0, block_size=8, pseudo_block=4),
               AdaptiveConfig(mass=0.2, min_blocks=10_000, block_size=8, pseudo_block=4),
               AdaptiveConfig(mass=0.2, block_size=8, pseudo_block=1)):
        assert (isa_attention_reference(q, k, v, layout, st) - dense).abs().max().item() <= 1e-12
    # with context pruning: attention over KV', which is the fixed mode with alpha_f = alpha_ns = 1
    kv_prime = isa_attention_reference(q, k, v, layout, ISAConfig(alpha_s=0.5, alpha_f=1.0, alpha_ns=1.0, block_size=8))
    for st in (AdaptiveConfig(mass=1.0, alpha_s=0.5, block_size=8, pseudo_block=2),
               AdaptiveConfig(mass=0.3, alpha_s=0.5, block_size=8, pseudo_block=1)):
        assert (isa_attention_reference(q, k, v, layout, st) - kv_prime).abs().max().item() <= 1e-12


def test_pseudo_block_equal_to_block_is_the_fixed_taylor_term(rng):
    """With s = b and the exact sets of a fixed-mode plan, the adaptive executor gives the fixed mode's output."""
    layout = LAYOUTS[1]
    q, k, v = _qkv(layout, rng)
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.25, alpha_ns=0.25, block_size=8)
    fixed_out, fixed_plan = isa_attention_reference(q, k, v, layout, cfg, return_plan=True)
    plan = plan_reference(q, k, layout, AdaptiveConfig(block_size=8, pseudo_block=8, alpha_s=0.5))
    plan = BlockPlan.from_masks(plan.blocks, plan.kv_keep, fixed_plan.exact_mask().clone(), plan.pseudo_block)
    assert torch.equal(plan.kv_keep, fixed_plan.kv_keep)
    assert (execute_plan_reference(q, k, v, plan) - fixed_out).abs().max().item() <= 1e-12


def test_mass_monotone_and_bounds(rng):
    layout = LAYOUTS[0]
    q, k, v = _qkv(layout, rng, sharp=3.0)
    prev = None
    for p in (0.2, 0.5, 0.8, 0.95, 1.0):
        plan = plan_reference(q, k, layout, AdaptiveConfig(mass=p, block_size=8))
        assert bool((plan.diagnostics["covered"] >= p - 1e-12).all())
        if prev is not None:
            assert bool((plan.diagnostics["n_exact"] >= prev).all())
        prev = plan.diagnostics["n_exact"]
    plan = plan_reference(q, k, layout, AdaptiveConfig(mass=0.99, min_blocks=2, max_blocks=3, block_size=8))
    assert int(plan.diagnostics["n_exact"].min()) >= 2 and int(plan.diagnostics["n_exact"].max()) <= 3


def test_pair_counts_brute_force(rng):
    layout = LAYOUTS[1]
    q, k, v = _qkv(layout, rng)
    st = AdaptiveConfig(mass=0.7, block_size=8, pseudo_block=4, alpha_s=0.5)
    plan = plan_reference(q, k, layout, st)
    B, H, _ = plan.kv_keep.shape
    exact, pseudo = naive_pair_counts(plan, [c for _, _, c in _spans_blocks(layout, 8)], 4)
    assert plan.pair_counts() == (exact, pseudo)
    N = layout.num_tokens
    assert plan.relative_cost() == pytest.approx((exact + pseudo) / (N * N * B * H), rel=1e-12)


def test_share_plan_serves_every_entry(rng):
    layout = LAYOUTS[0]
    q, k, v = _qkv(layout, rng, B=3)
    st = AdaptiveConfig(mass=0.7, block_size=8, alpha_s=0.5, share_plan=True)
    plan = plan_reference(q, k, layout, st)
    assert all(torch.equal(plan.exact_mask()[0], plan.exact_mask()[b]) for b in range(3))
    one = plan_reference(q.mean(0, keepdim=True), k.mean(0, keepdim=True), layout,
                         AdaptiveConfig(mass=0.7, block_size=8, alpha_s=0.5))
    assert torch.equal(plan.exact_mask()[:1], one.exact_mask())


def test_settings_validation():
    with pytest.raises(ValueError, match="mass"):
        AdaptiveSettings(mass=0.0)
    with pytest.raises(ValueError, match="pseudo_block"):
        AdaptiveConfig(block_size=64, pseudo_block=24)
    with pytest.raises(ValueError, match="max_blocks"):
        AdaptiveSettings(min_blocks=4, max_blocks=2)
    with pytest.raises(ValueError, match="min_blocks"):
        AdaptiveSettings(min_blocks=0)
    with pytest.raises(TypeError, match="mass"):
        AdaptiveSettings(mass="0.9")
    with pytest.raises(ValueError, match="3 heads"):
        AdaptiveConfig(mass=(0.5, 0.9)).per_head(3)


def test_non_finite_key_poisons_the_head(rng):
    layout = LAYOUTS[0]
    q, k, v = _qkv(layout, rng)
    k[0, 5, 1, 0] = float("nan")
    st = AdaptiveConfig(mass=0.5, block_size=8, alpha_s=0.5)
    for fn in (isa_attention_reference, adaptive_attention_flex):
        out = fn(q, k, v, layout, st)
        assert bool(out[0, :, 1].isnan().all()) and bool(out[0, :, 0].isfinite().all()) and bool(out[1].isfinite().all())


# ------------------------------------------------------------------ the FlexAttention path on CPU
@pytest.mark.parametrize("li, si", CASES)
def test_flex_matches_reference(li, si, rng):
    layout, st = LAYOUTS[li], SETTINGS[si]
    q, k, v = _qkv(layout, rng)
    out, plan = adaptive_attention_flex(q, k, v, layout, st, return_plan=True)
    ref, ref_plan = isa_attention_reference(q, k, v, layout, st, return_plan=True)
    assert torch.equal(plan.exact_mask(), ref_plan.exact_mask())
    assert (out - ref).abs().max().item() <= 1e-10
    q32, k32, v32 = q.float(), k.float(), v.float()
    out32 = adaptive_attention_flex(q32, k32, v32, layout, st)
    ref32 = execute_plan_reference(q32.double(), k32.double(), v32.double(), plan)
    assert (out32.double() - ref32).abs().max().item() <= 1e-4


@pytest.mark.parametrize("li, si", CASES)
def test_flex_block_tables_cover_exactly_the_mask(li, si, rng):
    """What the compiled kernel computes: listed full tiles all on, listed partial tiles through mask_mod,
    unlisted tiles off. That must equal mask_mod everywhere (eager Flex on CPU only applies mask_mod)."""
    layout, st = LAYOUTS[li], SETTINGS[si]
    q, k, v = _qkv(layout, rng)
    q_pad, kv_k, _, bm, _, mask_mod, _, _ = build_flex_inputs(q, k, v, plan_reference(q, k, layout, st))
    B, H, Nq, _ = q_pad.shape
    Nk = kv_k.shape[2]
    b = st.block_size
    bi = torch.arange(B)[:, None, None, None]
    hi = torch.arange(H)[None, :, None, None]
    qi = torch.arange(Nq)[None, None, :, None]
    ki = torch.arange(Nk)[None, None, None, :]
    want = mask_mod(bi, hi, qi, ki).expand(B, H, Nq, Nk)
    tiles_full = torch.zeros(B, H, Nq // b, Nk // b, dtype=torch.bool)
    tiles_part = torch.zeros_like(tiles_full)
    for tiles, num, idx in ((tiles_full, bm.full_kv_num_blocks, bm.full_kv_indices), (tiles_part, bm.kv_num_blocks, bm.kv_indices)):
        for b_ in range(B):
            for h in range(H):
                for i in range(Nq // b):
                    tiles[b_, h, i, idx[b_, h, i, : num[b_, h, i]].long()] = True
    assert not bool((tiles_full & tiles_part).any())
    up = lambda t: t.repeat_interleave(b, 2).repeat_interleave(b, 3)  # noqa: E731
    got = up(tiles_full) | (up(tiles_part) & want)
    assert torch.equal(got, want)
    # and no listed partial tile is empty (no wasted tiles)
    any_on = want.view(B, H, Nq // b, b, Nk // b, b).any(5).any(3)
    assert torch.equal(tiles_part | tiles_full, any_on)


# ------------------------------------------------------------------ the compiled path on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("block_size, pseudo_block", [(128, 16), (64, 64)])
def test_flex_gpu_matches_reference(block_size, pseudo_block, rng):
    from isa_plugin.kernels.testing import check_close, plan_rows

    layout = Layout([("target", 1000), ("context", 1000), ("text", 77)])
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(layout, rng, B=2, H=4, D=128, sharp=0.5))
    st = AdaptiveConfig(mass=0.85, pseudo_block=pseudo_block, alpha_s=0.5, block_size=block_size)
    out, plan = adaptive_attention_flex(q, k, v, layout, st, return_plan=True)
    rows = torch.arange(0, layout.num_tokens, 7, device="cuda")
    isa_plan = plan.at_pseudo_granularity()
    ref = plan_rows(q, k, v, isa_plan, rows)
    base = plan_rows(q, k, v, isa_plan, rows, lowp=True)
    ok, err, berr = check_close(out[:, rows].float(), ref, base, atol=1e-3)
    assert ok, (err, berr)
