"""GPU tests of the ISA kernels at real sizes (bf16/fp16), skipped without CUDA.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py``.
Large problems are checked on a sample of query rows against the reference semantics of the same plan.
"""

import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.executors.reference import plan_reference

pytestmark = pytest.mark.gpu


def _inputs(B, N, H, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, N, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _check(q, k, v, cp, out, n_rows=256):
    from isa_plugin.kernels.compact import compact_to_block_plan
    from isa_plugin.kernels.testing import check_close, plan_rows

    N = q.shape[1]
    rows = torch.unique(torch.cat([torch.randperm(N, device="cuda")[:n_rows], torch.tensor([0, N - 1], device="cuda")]))
    plan = compact_to_block_plan(cp)
    ref = plan_rows(q, k, v, plan, rows, chunk=32)
    base = plan_rows(q, k, v, plan, rows, lowp=True, chunk=32)
    ok, err, berr = check_close(out[:, rows].float(), ref, base, atol=1e-3)
    assert ok, f"kernel error {err:.3e} > 2 x torch-{q.dtype} error {berr:.3e} + 1e-3"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize(
    "spans,H,D,B",
    [
        ([("target", 8192), ("context", 8192)], 8, 128, 1),
        ([("text", 300), ("target", 5000), ("context", 2500), ("context", 2541)], 6, 64, 2),
        ([("target", 16380), ("context", 16380)], 4, 128, 1),
    ],
)
def test_bf16_real_sizes(spans, H, D, B, dtype, backend):
    from isa_plugin.kernels.executor import execute_compact
    from isa_plugin.selection.fixed_gpu import plan_compact

    layout = Layout(spans)
    q, k, v = _inputs(B, layout.num_tokens, H, D, dtype, 1)
    cfg = ISAConfig(alpha_s=0.25, alpha_f=tuple([0.5, 0.25, 0.75, 1.0, 0.3, 0.6, 0.4, 0.9][:H]), alpha_ns=0.0625)
    cp = plan_compact(q, k, layout, cfg)
    out = torch.full_like(q, float("nan"))
    execute_compact(q, k, v, cp, exact_backend=backend, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    _check(q, k, v, cp, out)


def test_planner_matches_reference_gpu():
    from isa_plugin.kernels.compact import compact_to_block_plan
    from isa_plugin.selection.fixed_gpu import plan_compact

    layout = Layout([("target", 4000), ("context", 3000), ("text", 100)])
    q, k, v = _inputs(2, layout.num_tokens, 4, 128, torch.float32, 2)
    cfg = ISAConfig(alpha_s=(0.2, 0.5, 1.0, 0.125), alpha_f=0.5, alpha_ns=0.1)
    ref = plan_reference(q, k, layout, cfg)
    got = compact_to_block_plan(plan_compact(q, k, layout, cfg))
    for f in ("kv_keep", "full_rows", "exact_mask"):
        a, b = getattr(ref, f), getattr(got, f)
        a, b = (a(), b()) if callable(a) else (a, b)
        # fp32 GPU matmuls may order sums differently: allow a handful of near-tie flips
        assert (a != b).float().mean().item() < 1e-2, f


def test_dispatch_and_dense_anchor():
    from isa_plugin import isa_attention
    from isa_plugin.attention import dense_attention

    layout = Layout([("target", 3000), ("context", 3100)])
    q, k, v = _inputs(1, layout.num_tokens, 4, 128, torch.bfloat16, 3)
    out, info = isa_attention(q, k, v, layout, ISAConfig(alpha_s=1, alpha_f=1, alpha_ns=1), return_info=True)
    assert info.backend == "triton"
    ref = dense_attention(q.float(), k.float(), v.float())
    base = dense_attention(q, k, v).float()
    err = (out.float() - ref).abs().max().item()
    berr = (base - ref).abs().max().item()
    assert err <= 2 * berr + 1e-3


def test_fp32_cuda_runs_in_fp32():
    from isa_plugin import isa_attention
    from isa_plugin.executors.reference import isa_attention_reference

    layout = Layout([("target", 700), ("context", 500)])
    q, k, v = _inputs(1, layout.num_tokens, 2, 64, torch.float32, 4)
    cfg = ISAConfig()
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    assert info.backend == "triton" and out.dtype == torch.float32
    ref = isa_attention_reference(q.double(), k.double(), v.double(), layout, cfg)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_torch_compile_opaque():
    from isa_plugin.executors.triton import isa_attention_kernels

    layout = Layout([("target", 1000), ("context", 1000)])
    q, k, v = _inputs(1, layout.num_tokens, 4, 128, torch.bfloat16, 5)
    cfg = ISAConfig()

    def f(q, k, v):
        return isa_attention_kernels(q * 1.0, k, v, layout, cfg) + 0

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert (compiled.float() - eager.float()).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_coarse_residual_kernel_route_matches_torch_route(dtype):
    """LIVEditor's gated coarse residual at 480p-like length: the Triton route against the PyTorch one."""
    from isa_plugin.kernels import coarse

    q, k, v = _inputs(2, 8190, 4, 128, dtype, 7)  # 127 full 64-blocks + a 62-token tail
    out = torch.randn_like(q)
    gate = (torch.rand(2, 8190, 1, device="cuda") - 0.5) * 0.5
    assert coarse.coarse_kernels_serve(q, k, v, 64, out)
    got = coarse.gated_coarse_residual(out, q, k, v, gate)
    q32, k32, v32 = (x.float().cpu() for x in (q, k, v))
    want = coarse.gated_coarse_residual(out.float().cpu(), q32, k32, v32, gate.cpu())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    compiled = torch.compile(lambda o, g: coarse.gated_coarse_residual(o, q, k, v, g), fullgraph=True)(out, gate)
    torch.testing.assert_close(compiled.float(), got.float(), rtol=tol, atol=tol)  # Inductor may fuse the softmax differently
