"""Cases of the block-sparse plan executor (``kernels/sparse_attn.py``) under TRITON_INTERPRET=1 (CPU).

Collected through ``test_sparse_attn_interp.py``, in this process when triton can still be put in
interpreter mode, else in a subprocess (the interpreter is chosen when a kernel is decorated, so
TRITON_INTERPRET must be set before triton is first imported). fp16 / fp32 only: the interpreter's
``tl.dot`` on bf16 is wrong (bf16 is covered by ``test_sparse_attn_gpu.py``). Every case executes the
same :class:`~isa_plugin.plan.BlockPlan` with the kernel and with the reference and compares by
FlashAttention's rule (kernel error <= 2 x the error of PyTorch in the input dtype + rounding), outputs
poisoned with NaN before the call.
"""

import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run where there is no GPU", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"
for _m in ("pooling", "sparse_attn"):
    _name = f"isa_plugin.kernels.{_m}"
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

from sparse_attn_helpers import LAYOUTS, qkv, random_plan, reference_out  # noqa: E402

from isa_plugin import Layout  # noqa: E402
from isa_plugin.kernels import sparse_attn  # noqa: E402
from isa_plugin.kernels.reference import dense_attention_reference  # noqa: E402
from isa_plugin.plan import BlockPlan  # noqa: E402

pytestmark = pytest.mark.interpreter

# tile shapes of the kernel the cases run with (the autotuner's one interpreter config is KB=1)
KB2 = {"KB": 2, "BP": 16, "num_warps": 4, "num_stages": 1}
KB1 = {"KB": 1, "BP": 32, "num_warps": 4, "num_stages": 1}
TMA = {"KB": 1, "BP": 32, "num_warps": 4, "num_stages": 1, "TMA": True}


def _run(q, k, v, plan, config=None, scale=None):
    """The host launcher on a NaN-poisoned output buffer (unwritten elements fail the comparison)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    starts, counts, log2n = sparse_attn.block_meta(plan.blocks, str(q.device))
    out = torch.full_like(q, float("nan"))
    sparse_attn.sparse_attn_fwd(q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n,
                                plan.blocks.block_size, scale, out=out, config=config)
    return out


def _assert_matches(out, q, k, v, plan, scale=None):
    ok, err, berr = reference_out(out, q, k, v, plan, scale)
    assert ok, f"kernel error {err:.3e} vs torch-{q.dtype} error {berr:.3e}"


@pytest.mark.parametrize(
    "spans,bs,B,H,D,dtype,config",
    [
        (LAYOUTS[1], 64, 2, 2, 64, torch.float16, KB2),  # text, 1-token span, two context spans; B=2
        (LAYOUTS[1], 64, 1, 2, 64, torch.float32, KB1),
        (LAYOUTS[2], 64, 1, 2, 128, torch.float16, None),  # the autotuner's (interpreter) config
        (LAYOUTS[0], 128, 2, 1, 64, torch.float16, KB1),
        (LAYOUTS[3], 128, 1, 2, 128, torch.float32, None),
        (LAYOUTS[1], 64, 2, 2, 64, torch.float16, TMA),  # K / V through TMA descriptors (short blocks: whole boxes)
        (LAYOUTS[0], 128, 1, 2, 128, torch.float16, TMA),
    ],
)
def test_matches_reference(rng, spans, bs, B, H, D, dtype, config):
    """Ragged layouts, B > 1 with a different plan per batch entry and head, empty / full / random rows."""
    layout = Layout(spans)
    q, k, v = qkv(rng, B, layout.num_tokens, H, D, dtype)
    plan = random_plan(layout.blocks(bs), B, H, rng)
    _assert_matches(_run(q, k, v, plan, config), q, k, v, plan)


@pytest.mark.parametrize("trial", range(4))
def test_random_list_lengths(rng, trial):
    """Property test: random layouts and list lengths, every row kind (empty, full, random) mixed,
    random kept fractions (a head may keep one block only), random tile shapes."""
    g = rng
    n_spans = int(torch.randint(1, 5, (1,), generator=g))
    kinds = ["target"] + [["target", "context", "text"][int(torch.randint(0, 3, (1,), generator=g))] for _ in range(n_spans - 1)]
    lens = [int(x) for x in torch.randint(1, 150, (n_spans,), generator=g)]
    if trial == 0:
        lens[0] = 1  # a 1-token span first
    layout = Layout(list(zip(kinds, lens)))
    bs = 64 if trial % 2 == 0 else 128
    B, H = 2, 1 + trial % 2
    dtype = torch.float16 if trial < 2 else torch.float32
    q, k, v = qkv(rng, B, layout.num_tokens, H, 64, dtype)
    plan = random_plan(layout.blocks(bs), B, H, rng, p_keep=float(torch.rand(1, generator=g)) * 0.9 + 0.1)
    config = [KB2, KB1, None, {"KB": 2, "BP": 16, "num_warps": 4, "num_stages": 1}][trial]
    _assert_matches(_run(q, k, v, plan, config), q, k, v, plan)


@pytest.mark.parametrize("bs,config", [(16, {"KB": 2, "BP": 16, "num_warps": 4, "num_stages": 1}),
                                       (32, {"KB": 1, "BP": 16, "num_warps": 4, "num_stages": 1}),
                                       (64, {"KB": 2, "BP": 16, "num_warps": 4, "num_stages": 1})])
def test_many_pseudo_tiles(rng, bs, config):
    """More KV' blocks than one pseudo-key tile holds (several tail tiles) and than one 32-bit word of the
    rows' exact-block bit sets holds."""
    layout = Layout([("target", 24 * bs + 5), ("text", 5), ("context", 1), ("context", 14 * bs - 3)])  # 41 blocks: two words of bits
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float16)
    plan = random_plan(layout.blocks(bs), 1, 2, rng, p_keep=0.9)
    _assert_matches(_run(q, k, v, plan, config), q, k, v, plan)


@pytest.mark.parametrize("kind", ["empty", "full"])
def test_all_rows_empty_or_full(rng, kind):
    """Only pseudo-keys (no exact block anywhere) and only exact blocks (no pseudo-key anywhere)."""
    layout = Layout(LAYOUTS[1])
    blocks = layout.blocks(64)
    nb = blocks.num_blocks
    q, k, v = qkv(rng, 2, layout.num_tokens, 2, 64, torch.float16)
    keep = torch.rand(2, 2, nb, generator=rng) < 0.6
    keep[..., 0] = True
    exact = torch.zeros(2, 2, nb, nb, dtype=torch.bool) if kind == "empty" else keep[:, :, None, :].expand(2, 2, nb, nb).clone()
    plan = BlockPlan.from_masks(blocks, keep, exact, pseudo_block=64)
    _assert_matches(_run(q, k, v, plan, KB2), q, k, v, plan)


@pytest.mark.parametrize("bs,D", [(64, 64), (128, 128)])
def test_full_rows_all_kept_is_dense(rng, bs, D):
    """Anchor: every row full and kv_keep all True is dense attention."""
    layout = Layout([("target", 90), ("context", 77), ("text", 3), ("context", 1)])
    blocks = layout.blocks(bs)
    nb = blocks.num_blocks
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, D, torch.float32)
    plan = BlockPlan.from_masks(blocks, torch.ones(1, 2, nb, dtype=torch.bool), torch.ones(1, 2, nb, nb, dtype=torch.bool), pseudo_block=bs)
    out = _run(q, k, v, plan)
    ref = dense_attention_reference(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_full_rows_is_attention_over_kv_prime(rng):
    """Anchor: every row full with some blocks dropped is dense attention over the kept tokens."""
    layout = Layout([("target", 130), ("context", 150)])
    blocks = layout.blocks(64)
    nb = blocks.num_blocks
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    keep = torch.rand(1, 2, nb, generator=rng) < 0.6
    keep[..., 0] = True
    plan = BlockPlan.from_masks(blocks, keep, keep[:, :, None, :].expand(1, 2, nb, nb).clone(), pseudo_block=64)
    out = _run(q, k, v, plan, KB2)
    for h in range(2):
        cols = keep[0, h][blocks.token_block]
        ref = dense_attention_reference(q[:, :, h : h + 1].double(), k[:, cols, h : h + 1].double(), v[:, cols, h : h + 1].double())
        assert (out[:, :, h : h + 1].double() - ref).abs().max().item() < 1e-5


def test_public_entry_point_and_fine_pseudo_keys(rng):
    """execute_block_plan on a plan with block-mean pseudo-keys, and on one with 32-token pseudo-keys
    (two slots per block in the tail), against the reference on the same plans."""
    layout = Layout(LAYOUTS[1])
    q, k, v = qkv(rng, 2, layout.num_tokens, 2, 64, torch.float16)
    plan = random_plan(layout.blocks(64), 2, 2, rng)
    _assert_matches(sparse_attn.execute_block_plan(q, k, v, plan), q, k, v, plan)
    fine = BlockPlan.from_masks(plan.blocks, plan.kv_keep, plan.exact_mask(), pseudo_block=32)
    _assert_matches(sparse_attn.execute_block_plan(q, k, v, fine, scale=0.1), q, k, v, fine.at_pseudo_granularity(), scale=0.1)


@pytest.mark.parametrize("kind", ["mean", "kmeans"])
@pytest.mark.parametrize("bs,ps", [(32, 8), (64, 16), (64, 4), (32, 16)])
def test_pseudo_key_slots_match_the_reference(rng, kind, bs, ps):
    """Plans with C = bs / ps pseudo-key slots per block (sub-block means, or k-means centroids whose clusters
    the slot kernel finds), short blocks and a text span included, against the reference on the same plan."""
    layout = Layout([("target", 2 * bs + 5), ("context", bs + 9), ("text", 7)])
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    plan = random_plan(layout.blocks(bs), 1, 2, rng)
    plan = BlockPlan.from_masks(plan.blocks, plan.kv_keep, plan.exact_mask(), pseudo_block=ps, pseudo_keys=kind)
    _assert_matches(sparse_attn.execute_block_plan(q, k, v, plan), q, k, v, plan)


def test_kmeans_pseudo_keys_differ_from_sub_block_means(rng):
    """The k-means slots are not the sub-block means they start from (the kernel runs the iterations)."""
    layout = Layout([("target", 64), ("context", 64)])
    q, k, v = qkv(rng, 1, layout.num_tokens, 1, 64, torch.float32)
    k = k + 3.0 * torch.randn(1, 128, 1, 1, generator=torch.Generator().manual_seed(1)).sign()  # two key clusters
    blocks = layout.blocks(32)
    keep = torch.ones(1, 1, blocks.num_blocks, dtype=torch.bool)
    exact = torch.eye(blocks.num_blocks, dtype=torch.bool)[None, None]  # every other block enters as pseudo-keys
    out = {kind: sparse_attn.execute_block_plan(q, k, v, BlockPlan.from_masks(blocks, keep, exact, pseudo_block=8, pseudo_keys=kind))
           for kind in ("mean", "kmeans")}
    assert (out["mean"] - out["kmeans"]).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_inputs_propagate_like_the_reference(rng):
    """A NaN in k (even in a dropped block) poisons its head; an Inf in v poisons its feature column."""
    layout = Layout([("target", 100), ("context", 100)])
    blocks = layout.blocks(64)
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    keep = torch.tensor([True, True, False, True]).expand(1, 2, 4).clone()
    plan = random_plan(blocks, 1, 2, rng)
    plan = BlockPlan.from_masks(blocks, keep, plan.exact_mask() & keep[:, :, None, :], pseudo_block=64)
    k[0, 140, 0, 3] = float("nan")  # block 2 (dropped) of head 0
    v[0, 10, 1, 5] = float("inf")  # head 1, column 5
    out = _run(q, k, v, plan)
    assert out[0, :, 0].isnan().all()
    assert out[0, :, 1, 5].isnan().all()
    ok_cols = torch.ones(64, dtype=torch.bool)
    ok_cols[5] = False
    assert not out[0, :, 1][:, ok_cols].isnan().any()
    from isa_plugin.kernels.reference import execute_plan_reference

    ref = execute_plan_reference(q.double(), k.double(), v.double(), plan)
    assert torch.equal(out.isnan(), ref.isnan())
    fin = ~ref.isnan()
    assert (out.double()[fin] - ref[fin]).abs().max().item() < 1e-5


def test_ineligible_and_validation(rng):
    layout = Layout([("target", 70), ("context", 64)])
    blocks = layout.blocks(64)
    q, k, v = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    plan = random_plan(blocks, 1, 2, rng)
    assert sparse_attn.sparse_ineligible(q, plan) is None
    assert "head_dim=80" in sparse_attn.sparse_ineligible(torch.zeros(1, 134, 2, 80), plan)
    assert "dtype torch.int32" in sparse_attn.sparse_ineligible(torch.zeros(1, 134, 2, 64, dtype=torch.int32), plan)
    assert "stride" in sparse_attn.sparse_ineligible(torch.zeros(1, 134, 64, 2).transpose(-1, -2), plan)
    odd = BlockPlan.from_masks(layout.blocks(48), torch.ones(1, 2, 4, dtype=torch.bool), torch.zeros(1, 2, 4, 4, dtype=torch.bool), pseudo_block=48)
    assert "block size 48" in sparse_attn.sparse_ineligible(q, odd)
    with pytest.raises(ValueError, match="head_dim=80"):
        x = torch.zeros(1, 134, 2, 80)
        sparse_attn.execute_block_plan(x, x, x, plan)
    with pytest.raises(ValueError, match="batch 1 and 2 heads but q has batch 1 and 3 heads"):
        x = torch.zeros(1, 134, 3, 64)
        sparse_attn.execute_block_plan(x, x, x, plan)
    with pytest.raises(ValueError, match="134 tokens"):
        x = torch.zeros(1, 135, 2, 64)
        sparse_attn.execute_block_plan(x, x, x, plan)
    with pytest.raises(ValueError, match="one dtype"):
        sparse_attn.execute_block_plan(q, k.half(), v, plan)
    with pytest.raises(ValueError, match="scale=nan"):
        sparse_attn.execute_block_plan(q, k, v, plan, scale=float("nan"))
    with pytest.raises(TypeError, match="BlockPlan"):
        sparse_attn.execute_block_plan(q, k, v, object())
    with pytest.raises(ValueError, match="unknown launch parameters"):
        _run(q, k, v, plan, {"KB": 1, "BLOCK_M": 64})


def test_custom_op_fake_and_compile(rng):
    """The op has a fake implementation (opcheck) and compiles without graph breaks."""
    layout = Layout([("target", 70), ("context", 64)])
    blocks = layout.blocks(64)
    q, k, v = qkv(rng, 1, layout.num_tokens, 1, 64, torch.float32)
    plan = random_plan(blocks, 1, 1, rng)
    starts, counts, log2n = sparse_attn.block_meta(blocks, "cpu")
    args = (q, k, v, plan.kv_keep, plan.row_ptr, plan.col_idx, starts, counts, log2n, 64, 0.125, 64, 0)
    torch.library.opcheck(sparse_attn.sparse_attn_op, args, test_utils=("test_schema", "test_faketensor"))
    eager = sparse_attn.sparse_attn_op(*args)
    f = torch.compile(lambda *a: sparse_attn.sparse_attn_op(*a) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(*args), eager * 2)


def test_executor_plan_serves_later_inputs():
    """The block-sparse executor's plan made on one step's q, k runs another step's q, k, v as the reference
    runs the reference plan of the first step (plan reuse across denoising steps; pseudo-keys of the new k, v)."""
    from isa_plugin import ISAConfig
    from sparse_attn_helpers import stale_plan_outputs

    rng = torch.Generator().manual_seed(5)
    layout = Layout(LAYOUTS[1])
    cfg = ISAConfig("adaptive", block_size=64, mass=0.8)
    q1, k1, _ = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    q2, k2, v2 = qkv(rng, 1, layout.num_tokens, 2, 64, torch.float32)
    got, ref, _ = stale_plan_outputs("sparse", layout, cfg, (q1, k1), (q2, k2, v2), 64 ** -0.5)
    assert (got - ref).abs().max().item() < 1e-4
