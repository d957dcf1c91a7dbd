"""GPU tests of the block-sparse plan executor (``kernels/sparse_attn.py``), skipped without CUDA.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/kernels/test_sparse_attn_gpu.py``.
bf16 and fp16 (the interpreter's bf16 dots are wrong, so bf16 is only covered here) against the reference
on the same plan, by FlashAttention's rule: kernel error <= 2 x the error of PyTorch in the same dtype
+ rounding. Small problems are compared whole, large ones on a sample of query rows. Also: no host
synchronisation in a call, CUDA-graph capture and replay, the dense anchor.
"""

import pytest
import torch

from sparse_attn_helpers import LAYOUTS, random_plan, reference_out, sparsity_plan

from isa_plugin import Layout
from isa_plugin.plan import BlockPlan

pytestmark = pytest.mark.gpu

RAGGED = [("text", 77), ("target", 1500), ("context", 1), ("context", 1201), ("target", 63)]


def _inputs(B, N, H, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, N, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _run(q, k, v, plan, scale=None, config=None):
    """The host launcher on a NaN-poisoned output buffer (unwritten elements fail the comparison)."""
    from isa_plugin.kernels import sparse_attn

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    starts, counts, log2n = sparse_attn.block_meta(plan.blocks, str(q.device))
    out = torch.full_like(q, float("nan"))
    sparse_attn.sparse_attn_fwd(q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n,
                                plan.blocks.block_size, scale, out=out, config=config)
    torch.cuda.synchronize()
    return out


def _group_configs(bs, dtype, D):
    from isa_plugin.kernels import sparse_attn

    group = sparse_attn._CONFIG_GROUPS[sparse_attn._group(bs, dtype == torch.float32, D)]
    return [{"KB": kb, "BP": bp, "num_warps": w, "num_stages": st, "TMA": tma} for kb, bp, w, st, tma in map(sparse_attn._entry, group)]


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 128), (torch.bfloat16, 64), (torch.float16, 64)])
@pytest.mark.parametrize("bs", [64, 128])
def test_matches_reference_ragged(dtype, D, bs):
    """Ragged spans (text, a 1-token span, two context spans, a short target span), B = 2 with a
    different plan per entry and head, empty / full / random rows; whole outputs compared. bf16 with
    D = 128 runs every config the autotuner may pick; the other dtypes / head dims one config each."""
    layout = Layout(RAGGED)
    q, k, v = _inputs(2, layout.num_tokens, 3, D, dtype, seed=bs + D)
    plan = random_plan(layout.blocks(bs), 2, 3, _gen(7 + bs), device="cuda")
    configs = _group_configs(bs, dtype, D)
    for config in configs if (dtype, D) == (torch.bfloat16, 128) else configs[:1]:
        out = _run(q, k, v, plan, config=config)
        ok, err, berr = reference_out(out, q, k, v, plan)
        assert ok, f"{config}: kernel error {err:.3e} > 2 x torch-{dtype} error {berr:.3e} + 2e-4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs,sparsity", [(128, 0.75), (64, 0.9), (128, 0.0)])
def test_large_sampled_rows(dtype, bs, sparsity):
    """N = 32,760 (Wan 480p, two videos), 4 heads, D = 128: the benchmark's kind of plan; sampled rows."""
    half = 16380
    layout = Layout([("target", half), ("context", half)])
    q, k, v = _inputs(1, layout.num_tokens, 4, 128, dtype, seed=3)
    plan = sparsity_plan(layout.blocks(bs), 1, 4, sparsity, seed=1)
    out = _run(q, k, v, plan)
    rows = torch.unique(torch.cat([torch.randperm(layout.num_tokens, device="cuda", generator=_gen(5))[:192],
                                   torch.tensor([0, half - 1, half, layout.num_tokens - 1], device="cuda")]))
    ok, err, berr = reference_out(out, q, k, v, plan, rows=rows)
    assert ok, f"kernel error {err:.3e} > 2 x torch-{dtype} error {berr:.3e} + 1e-3"


def test_fp32_and_fine_pseudo_keys():
    """float32 on CUDA (IEEE dots), and a plan with 32-token pseudo-keys run through the public function."""
    from isa_plugin.kernels.sparse_attn import execute_block_plan

    layout = Layout(LAYOUTS[1])
    q, k, v = _inputs(2, layout.num_tokens, 2, 64, torch.float32, seed=11)
    plan = random_plan(layout.blocks(64), 2, 2, _gen(3), device="cuda")
    ok, err, berr = reference_out(_run(q, k, v, plan), q, k, v, plan)
    assert ok, f"fp32: kernel error {err:.3e} vs torch error {berr:.3e}"
    qh, kh, vh = (x.to(torch.bfloat16) for x in (q, k, v))
    fine = BlockPlan.from_masks(plan.blocks, plan.kv_keep, plan.exact_mask(), pseudo_block=32)
    ok, err, berr = reference_out(execute_block_plan(qh, kh, vh, fine), qh, kh, vh, fine.at_pseudo_granularity())
    assert ok, f"fine pseudo-keys: kernel error {err:.3e} vs torch-bf16 error {berr:.3e}"


@pytest.mark.parametrize("bs,ps,dtype", [(128, 16, torch.bfloat16), (64, 16, torch.float16), (128, 32, torch.float32)])
def test_kmeans_pseudo_keys(bs, ps, dtype):
    """k-means pseudo-key slots (computed by the slot kernel, C = bs / ps per block) against the reference on
    the same plan; every input dtype."""
    from isa_plugin.kernels.sparse_attn import execute_block_plan

    layout = Layout(LAYOUTS[1])
    q, k, v = _inputs(2, layout.num_tokens, 2, 64 if dtype == torch.float32 else 128, dtype, seed=12)
    if dtype == torch.float32 and bs > 64:
        bs = 64
    plan = random_plan(layout.blocks(bs), 2, 2, _gen(4), device="cuda")
    plan = BlockPlan.from_masks(plan.blocks, plan.kv_keep, plan.exact_mask(), pseudo_block=ps, pseudo_keys="kmeans")
    ok, err, berr = reference_out(execute_block_plan(q, k, v, plan), q, k, v, plan)
    assert ok, f"kmeans pseudo-keys: kernel error {err:.3e} vs torch-{dtype} error {berr:.3e}"


@pytest.mark.parametrize("bs", [64, 128])
def test_all_full_rows_is_dense_attention(bs):
    """Anchor: every row full and every block kept is dense attention (against SDPA in bf16's rule)."""
    from isa_plugin.kernels.sparse_attn import execute_block_plan

    layout = Layout([("target", 2000), ("context", 1999), ("text", 9)])
    blocks = layout.blocks(bs).to("cuda")
    nb = blocks.num_blocks
    q, k, v = _inputs(1, layout.num_tokens, 2, 128, torch.bfloat16, seed=bs)
    plan = BlockPlan.from_masks(blocks, torch.ones(1, 2, nb, dtype=torch.bool, device="cuda"),
                                torch.ones(1, 2, nb, nb, dtype=torch.bool, device="cuda"), pseudo_block=bs)
    out = execute_block_plan(q, k, v, plan).float()
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    base = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2).float()
    err, berr = (out - ref).abs().max().item(), (base - ref).abs().max().item()
    assert err <= 2 * berr + 1e-3, f"kernel error {err:.3e} vs SDPA-bf16 error {berr:.3e}"


def _call_setup(bs=128):
    layout = Layout(RAGGED)
    q, k, v = _inputs(2, layout.num_tokens, 3, 128, torch.bfloat16, seed=21)
    plan = random_plan(layout.blocks(bs), 2, 3, _gen(9), device="cuda")
    return q, k, v, plan


def _assert_no_host_sync(call):
    """After a first (autotuning, cache-filling) call, ``call()`` reads no device value on the host; returns its output."""
    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return out


def _assert_graph_replays(call, q, k, v, seed):
    """``call()`` captures in a CUDA graph; replays after copying new inputs into q, k, v equal eager calls."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # warm the side stream (allocator pools)
        with torch.cuda.graph(g, stream=s):
            static_out = call()
    torch.cuda.current_stream().wait_stream(s)
    for i in (1, 2):
        nq, nk, nv = _inputs(*q.shape, q.dtype, seed=seed + i)
        q.copy_(nq), k.copy_(nk), v.copy_(nv)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, call())


def test_no_host_synchronisation():
    """After a first (autotuning) call, a call reads no device value on the host."""
    from isa_plugin.kernels.sparse_attn import execute_block_plan

    q, k, v, plan = _call_setup()
    out = _assert_no_host_sync(lambda: execute_block_plan(q, k, v, plan))
    assert not out.isnan().any()


def test_cuda_graph_capture_and_replay():
    """The whole call captures in a CUDA graph; replays on new inputs equal eager calls."""
    from isa_plugin.kernels.sparse_attn import execute_block_plan

    q, k, v, plan = _call_setup()
    execute_block_plan(q, k, v, plan)  # autotune and fill the caches outside the capture
    torch.cuda.synchronize()
    _assert_graph_replays(lambda: execute_block_plan(q, k, v, plan), q, k, v, seed=100)


def test_compile_fullgraph():
    """torch.compile sees the executor as one opaque op (no graph break)."""
    from isa_plugin.kernels import sparse_attn

    q, k, v, plan = _call_setup(64)
    starts, counts, log2n = sparse_attn.block_meta(plan.blocks, "cuda")
    args = (q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n, 64, 128 ** -0.5, 64, 0)
    eager = sparse_attn.sparse_attn_op(*args)
    f = torch.compile(lambda *a: sparse_attn.sparse_attn_op(*a) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(*args), eager * 2)


@pytest.mark.parametrize("mode,settings", [("adaptive", {"mass": 0.8, "alpha_s": 0.5}), ("fixed", {})])
def test_whole_call_without_host_synchronisation_in_a_cuda_graph(mode, settings):
    """Planning included (pooling, context saliency, the mode's selection, the lists) and execution: after a
    first call, a whole call reads no device value on the host and captures in a CUDA graph whose replays on
    new inputs equal eager calls."""
    import isa_plugin.executors  # noqa: F401  (registers the package's executors)
    from isa_plugin import ISAConfig
    from isa_plugin.execution import get_executor

    layout = Layout(RAGGED)
    q, k, v = _inputs(2, layout.num_tokens, 3, 128, torch.bfloat16, seed=31)
    config = ISAConfig(mode, block_size=128, backend="sparse", **settings)
    executor = get_executor("sparse")

    def call():
        return executor.run(q, k, v, layout, config, 128 ** -0.5)

    assert _assert_no_host_sync(call).isfinite().all()
    _assert_graph_replays(call, q, k, v, seed=200)


@pytest.mark.parametrize("spans,B,H,settings", [
    ([("target", 32768), ("context", 32768)], 1, 4, dict(mass=0.7, alpha_s=1.0)),
    (RAGGED, 2, 3, dict(mass=(0.6, 0.95, 0.9), context_mass=0.8, alpha_s=0.5, min_blocks=2, max_blocks=(0, 5, 0))),
])
def test_fused_adaptive_planner_on_gpu_equals_the_torch_planner(spans, B, H, settings):
    from sparse_attn_helpers import check_fused_adaptive_plan

    check_fused_adaptive_plan(Layout(spans), B, H, settings, device="cuda", block_size=128, D=128)
