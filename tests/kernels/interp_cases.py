"""Cases of the ISA Triton kernels under TRITON_INTERPRET=1 on small ragged shapes (CPU, fp16/fp32).

Collected through ``test_kernels_interp.py``, in this process when triton can still be put in
interpreter mode, else in a subprocess. The interpreter is chosen when a kernel (and triton's own
``tl.sum`` & co.) is decorated, so TRITON_INTERPRET must be set before triton is first imported; this
module sets it and reloads the kernel modules if they were imported compiled. On a machine with CUDA the
cases are skipped (the GPU tests cover the compiled kernels).
"""

import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run where there is no GPU", allow_module_level=True)

# the modules that define Triton kernels or import them, in dependency order; modules imported before
# TRITON_INTERPRET=1 was set are reloaded (when it was set for the whole session they already interpret, and
# reloading would register the executors a second time)
_MODS = [f"isa_plugin.kernels.{m}" for m in ("pooling", "coarse_triton", "isa_attn", "compact", "executor", "select", "mass_select", "flex")]
_MODS += ["isa_plugin.selection.fixed_gpu", "isa_plugin.executors.triton"]
if os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _MODS:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from isa_plugin import ISAConfig, Layout  # noqa: E402
from isa_plugin.executors.reference import plan_reference  # noqa: E402
from isa_plugin.kernels import compact, executor, pooling  # noqa: E402
from isa_plugin.kernels.reference import dense_attention_reference, execute_plan_reference, pool_blocks  # noqa: E402
from isa_plugin.kernels.testing import check_close, plan_rows  # noqa: E402
from isa_plugin.selection import fixed_gpu, plan_from_pooled  # noqa: E402

pytestmark = pytest.mark.interpreter

LAYOUTS = [
    [("target", 150), ("context", 130)],
    [("text", 20), ("target", 100), ("context", 1), ("context", 70), ("target", 65)],
    [("context", 64), ("target", 1), ("target", 127), ("text", 33)],
]


def _qkv(rng, B, N, H, D, dtype):
    return [torch.randn(B, N, H, D, generator=rng).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("spans", LAYOUTS)
def test_pooling_matches_reference(rng, spans):
    layout = Layout(spans)
    q, k, v = _qkv(rng, 2, layout.num_tokens, 2, 64, torch.float16)
    blocks = layout.blocks(64)
    got = pooling.pool_blocks_triton(q, k, v, starts=blocks.starts.int(), counts=blocks.counts.int(), block_size=64)
    for x, g in zip((q, k, v), got):
        torch.testing.assert_close(g, pool_blocks(x, blocks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliced", [False, True])
def test_gather_blocks(rng, sliced):
    layout = Layout([("target", 100), ("context", 70)])
    q, k, v = _qkv(rng, 2, layout.num_tokens, 3, 64, torch.float16)
    blocks = layout.blocks(64)
    blist = torch.tensor([[[1, 3], [0, 2]], [[2, 2], [3, 0]]], dtype=torch.int32)
    if sliced:  # a slice of a larger list (the executor passes views of kv_list): strides, no copy
        big = torch.full((2, 4, 5), 99, dtype=torch.int32)
        big[:, 1:3, :2] = blist
        blist = big[:, 1:3, :2]
    heads = torch.tensor([2, 0], dtype=torch.int32)
    kg, vg = pooling.gather_blocks_triton(k, v, blist=blist, heads=heads, starts=blocks.starts.int(), counts=blocks.counts.int(), block_size=64)
    for b in range(2):
        for j, h in enumerate(heads.tolist()):
            for s, blk in enumerate(blist[b, j].tolist()):
                st, n = int(blocks.starts[blk]), int(blocks.counts[blk])
                rows = torch.clamp(torch.arange(64), max=n - 1) + st
                assert torch.equal(kg[b, j, s * 64 : (s + 1) * 64], k[b, rows, h])
                assert torch.equal(vg[b, j, s * 64 : (s + 1) * 64], v[b, rows, h])


@pytest.mark.parametrize("spans", LAYOUTS)
@pytest.mark.parametrize("per_head", [False, True])
def test_planner_matches_reference(rng, spans, per_head):
    """Same selections as plan_from_pooled on the same (fp64) block means: no near-ties at fp64."""
    layout = Layout(spans)
    H = 3
    q, k, v = _qkv(rng, 2, layout.num_tokens, H, 32, torch.float64)
    cfg = ISAConfig(alpha_s=(0.3, 0.6, 1.0) if per_head else 0.4, alpha_f=(0.25, 0.5, 0.9) if per_head else 0.5,
                    alpha_ns=(0.2, 0.5, 1.0) if per_head else 0.3)
    blocks = layout.blocks(64)
    qbar, kbar = pool_blocks(q, blocks), pool_blocks(k, blocks)
    ref = plan_from_pooled(cfg.selection, qbar, kbar, blocks, cfg.settings, 32 ** -0.5)
    got = compact.compact_to_block_plan(fixed_gpu.plan_compact_from_pooled(qbar, kbar, blocks, cfg, 32 ** -0.5))
    for f in ("kv_keep", "full_rows", "exact_mask"):
        a, b = getattr(ref, f), getattr(got, f)
        assert torch.equal(a() if callable(a) else a, b() if callable(b) else b), f
    rt = compact.compact_to_block_plan(compact.compact_from_block_plan(ref))
    assert torch.equal(rt.exact_mask(), ref.exact_mask()) and torch.equal(rt.full_rows, ref.full_rows)


@pytest.mark.parametrize(
    "spans,B,H,D,dtype,cfg",
    [
        (LAYOUTS[0], 1, 2, 64, torch.float16, ISAConfig()),
        (LAYOUTS[1], 2, 2, 64, torch.float16, ISAConfig(alpha_s=(0.5, 1.0), alpha_f=(0.3, 0.6), alpha_ns=0.3)),
        (LAYOUTS[2], 2, 1, 128, torch.float32, ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.4)),
        (LAYOUTS[1], 1, 2, 128, torch.float16, ISAConfig(alpha_s=0.25, alpha_f=0.25, alpha_ns=0.1)),
    ],
)
def test_kernel_matches_reference_same_plan(rng, spans, B, H, D, dtype, cfg):
    layout = Layout(spans)
    q, k, v = _qkv(rng, B, layout.num_tokens, H, D, dtype)
    plan = plan_reference(q, k, layout, cfg)  # the reference's plan, executed by both
    cp = compact.compact_from_block_plan(plan)
    out = torch.full_like(q, float("nan"))
    executor.execute_compact(q, k, v, cp, exact_backend="triton", out=out)
    assert not out.isnan().any(), "unwritten output elements"
    rows = torch.arange(layout.num_tokens)
    ref = plan_rows(q.double(), k.double(), v.double(), plan, rows)
    base = plan_rows(q, k, v, plan, rows, lowp=True) if dtype != torch.float32 else execute_plan_reference(q, k, v, plan).double()
    ok, err, berr = check_close(out, ref, base, atol=1e-5 if dtype == torch.float32 else 2e-4)
    assert ok, f"kernel error {err:.3e} vs torch-{dtype} error {berr:.3e}"


def test_batch_entries_get_different_selections(rng):
    layout = Layout(LAYOUTS[0])
    q, k, v = _qkv(rng, 2, layout.num_tokens, 2, 64, torch.float32)
    k[1] = -k[1]
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.3)
    cp = fixed_gpu.plan_compact(q, k, layout, cfg, v=v)
    out = executor.execute_compact(q, k, v, cp, exact_backend="triton")
    ref = execute_plan_reference(q.double(), k.double(), v.double(), compact.compact_to_block_plan(cp))
    assert (out.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("D", [64, 128])
def test_all_ratios_one_is_dense(rng, D):
    layout = Layout([("target", 90), ("context", 77), ("text", 3)])
    q, k, v = _qkv(rng, 1, layout.num_tokens, 2, D, torch.float32)
    cfg = ISAConfig(alpha_s=1, alpha_f=1, alpha_ns=1)
    cp = fixed_gpu.plan_compact(q, k, layout, cfg, v=v, defer_selections=True)
    out = torch.full_like(q, float("nan"))
    executor.execute_compact(q, k, v, cp, exact_backend="triton", out=out)
    ref = dense_attention_reference(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_alpha_ns_one_is_attention_over_kv_prime(rng):
    layout = Layout([("target", 130), ("context", 150)])
    q, k, v = _qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.25, alpha_ns=1)
    cp = fixed_gpu.plan_compact(q, k, layout, cfg, v=v)
    out = executor.execute_compact(q, k, v, cp, exact_backend="triton")
    keep = compact.compact_to_block_plan(cp).kv_keep[0]  # [H, nb]
    tb = layout.blocks(64).token_block
    for h in range(2):
        cols = keep[h][tb]
        ref = dense_attention_reference(q[:, :, h : h + 1].double(), k[:, cols, h : h + 1].double(), v[:, cols, h : h + 1].double())
        assert (out[:, :, h : h + 1].double() - ref).abs().max().item() < 1e-5


def test_custom_op_compiles_without_graph_breaks(rng):
    from isa_plugin.executors.triton import isa_attention_kernels

    layout = Layout([("target", 70), ("context", 64)])
    q, k, v = _qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    cfg = ISAConfig(alpha_s=0.5)
    eager = isa_attention_kernels(q, k, v, layout, cfg)
    f = torch.compile(lambda q, k, v: isa_attention_kernels(q, k, v, layout, cfg) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(q, k, v), eager * 2)
    ref = execute_plan_reference(q.double(), k.double(), v.double(), plan_reference(q.double(), k.double(), layout, cfg))
    assert (eager.double() - ref).abs().max().item() < 1e-5


def test_deferred_selections_equal_direct_plan(rng):
    """plan_compact(defer_selections=True) + finish_selections() is the direct plan; finishing twice is a no-op."""
    layout = Layout(LAYOUTS[1])
    q, k, v = _qkv(rng, 2, layout.num_tokens, 2, 32, torch.float32)
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.4, alpha_ns=0.3)
    direct = fixed_gpu.plan_compact(q, k, layout, cfg, v=v)
    deferred = fixed_gpu.plan_compact(q, k, layout, cfg, v=v, defer_selections=True)
    assert direct.pending is None and deferred.pending is not None and deferred.tsel is None
    assert deferred.finish_selections() is deferred and deferred.pending is None
    tsel = deferred.tsel
    deferred.finish_selections()
    assert deferred.tsel is tsel
    for f in ("kv_list", "kv_len", "exact_q", "tsel_len", "approx"):
        assert torch.equal(getattr(direct, f), getattr(deferred, f)), f
    ra, rb = compact.compact_to_block_plan(direct), compact.compact_to_block_plan(deferred)
    assert torch.equal(ra.exact_mask(), rb.exact_mask())


def test_entry_point_rejects_unknown_exact_backend(rng):
    from isa_plugin.executors.triton import isa_attention_kernels

    layout = Layout([("target", 70), ("context", 64)])
    q, k, v = _qkv(rng, 1, layout.num_tokens, 1, 32, torch.float32)
    with pytest.raises(ValueError, match="exact_backend='cudnn'"):
        isa_attention_kernels(q, k, v, layout, ISAConfig(), exact_backend="cudnn")


def test_launcher_validates():
    from isa_plugin.kernels.isa_attn import isa_attn_items

    q = torch.randn(1, 10, 1, 80)
    with pytest.raises(ValueError, match="head_dim=80"):
        isa_attn_items(q, q, q, q, None, None, None, None, None, torch.zeros(1, dtype=torch.int32), None, None, None, None, block_size=64, scale=1.0)


@pytest.mark.parametrize("spans", LAYOUTS)
@pytest.mark.parametrize("per_head", [False, True])
def test_taylor_select_kernel_matches_torch_path(rng, spans, per_head):
    """The Triton selection kernel and the torch path give the same Taylor lists on the same logits."""
    layout = Layout(spans)
    H = 2
    q, k, v = _qkv(rng, 2, layout.num_tokens, H, 32, torch.float32)
    cfg = ISAConfig(alpha_s=(0.4, 1.0) if per_head else 0.5, alpha_f=0.5, alpha_ns=(0.2, 0.6) if per_head else 0.3)
    blocks = layout.blocks(64)
    qbar, kbar = pool_blocks(q, blocks), pool_blocks(k, blocks)
    a = fixed_gpu._plan_stage1(qbar, kbar, blocks, cfg, 32 ** -0.5).finish_selections(use_kernel=True)
    b = fixed_gpu._plan_stage1(qbar, kbar, blocks, cfg, 32 ** -0.5).finish_selections(use_kernel=False)
    ra, rb = compact.compact_to_block_plan(a), compact.compact_to_block_plan(b)
    assert torch.equal(ra.exact_mask(), rb.exact_mask())
    tay = ~a.exact_q
    assert torch.equal(a.approx[tay], b.approx[tay])
    assert torch.equal(a.tsel_len[tay], b.tsel_len[tay])


def test_topk_mass_kernel(rng):
    from isa_plugin.kernels.select import topk_mass_triton

    P = torch.rand(2, 3, 20, 50, generator=rng)
    got = topk_mass_triton(P, 5, 37, 4)
    ref = P[..., 5:42].topk(4, dim=-1).values.sum(-1)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,bs", [(200, 64), (128, 64), (37, 16)])
def test_coarse_residual_kernels_match_torch_route(rng, dtype, N, bs):
    """LIVEditor's gated coarse residual: Triton pooling + in-place add against the PyTorch route."""
    from isa_plugin.kernels import coarse

    q, k, v = _qkv(rng, 2, N, 3, 32, dtype)
    out = torch.randn(2, N, 3, 32, generator=rng).to(dtype)
    gate = (torch.rand(2, N, 1, generator=rng) - 0.5) * 0.5
    want = coarse.gated_coarse_residual(out.float(), q.float(), k.float(), v.float(), gate, bs)  # CPU: torch route
    got = out.clone()
    assert coarse._add_residual_kernels(got, q, k, v, gate, bs, None) is got
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert (got.float() - out.float()).abs().max() > 10 * tol  # the residual was added


def test_coarse_residual_add_validates():
    from isa_plugin.kernels.coarse_triton import coarse_residual_add_triton

    out, gate = torch.zeros(1, 10, 2, 32), torch.zeros(1, 10)
    with pytest.raises(ValueError, match="rows must be"):
        coarse_residual_add_triton(out, torch.zeros(1, 2, 2, 32), gate, 4)  # nb = 3
    with pytest.raises(ValueError, match="head_dim=24"):
        coarse_residual_add_triton(torch.zeros(1, 10, 2, 24), torch.zeros(1, 2, 3, 24), gate, 4)


def test_executor_plan_serves_later_inputs(rng):
    """The Triton executor's plan (selections only) made on one step's q, k runs another step's q, k, v as the
    reference runs the reference plan of the first step (plan reuse across denoising steps)."""
    from sparse_attn_helpers import stale_plan_outputs

    layout = Layout(LAYOUTS[1])
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.4, alpha_ns=0.3)
    q1, k1, _ = _qkv(rng, 2, layout.num_tokens, 2, 32, torch.float32)
    q2, k2, v2 = _qkv(rng, 2, layout.num_tokens, 2, 32, torch.float32)
    got, ref, fresh = stale_plan_outputs("triton", layout, cfg, (q1, k1), (q2, k2, v2), 32 ** -0.5)
    assert (got - ref).abs().max().item() < 1e-5
    assert (fresh - ref).abs().max().item() > 1e-3  # the stale plan is a different plan for these inputs


# ---------------------------------------------------------------------------------------------- adaptive selection
@pytest.mark.parametrize("layout_spans,B,H,settings", [
    ([("target", 700), ("context", 640)], 2, 3, dict(mass=0.8, alpha_s=0.5)),
    ([("text", 77), ("target", 1000), ("context", 1), ("context", 600)], 1, 2,
     dict(mass=(0.6, 0.95), context_mass=0.9, alpha_s=(1.0, 0.25), min_blocks=2, max_blocks=(0, 5))),
    ([("target", 512), ("context", 512)], 1, 2, dict(mass=1.0, alpha_s=1.0)),
])
def test_fused_adaptive_planner_equals_the_torch_planner(layout_spans, B, H, settings):
    """``AdaptiveMode.plan_fused`` (the GPU planner's two Triton kernels) gives the torch planner's plan."""
    from sparse_attn_helpers import check_fused_adaptive_plan

    check_fused_adaptive_plan(Layout(layout_spans), B, H, settings, device="cpu")
