"""Bad-input matrix: every row either works correctly, falls back to dense attention with a counted
reason, or raises an error that names the bad value and the fix.

Rows: profiles (another model or config, corrupt, truncated, empty, future version, out-of-range ratios),
non-finite q/k/v, attention masks, unsupported head_dim / dtype / block size, spans shorter than a block,
empty or missing context, a layout of the wrong length, per-entry layouts, runs at another size than the
calibrated one, two pipelines with different profiles in one process.
"""

import math
import types
import warnings

import pytest
import torch

from rel_helpers import EXACT, SPARSE, counters, qkv
from isa_plugin import ISAConfig, Layout, isa_attention
from isa_plugin.attention import dense_attention
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference
from isa_plugin.layer_setting import LayerSetting, ProfileError
from isa_plugin.profile import ThresholdProfile, config_hash

NAMES = ["blocks.0.attn1", "blocks.1.attn1"]


def _wan_profile(t, **on):
    meta = {"transformer_class": type(t).__name__, "config_hash": config_hash(t)}
    meta.update(on)
    return ThresholdProfile.uniform(NAMES, SPARSE, calibrated_on=meta)


def _apply(t, cfg, frames_ctx=2):
    from isa_plugin import apply_isa
    from isa_plugin.adapters.families.wan import WanICLLayout

    return apply_isa(t, cfg, layout=WanICLLayout(frames_ctx))


# ============================================================================ profiles
def test_profile_for_another_model_class(wan_kit):
    from isa_plugin import apply_isa

    t = wan_kit.wan()
    prof = ThresholdProfile.uniform(NAMES, SPARSE, calibrated_on={"transformer_class": "LTXVideoTransformer3DModel"})
    with pytest.raises(ValueError, match=r"calibrated for LTXVideoTransformer3DModel, not WanTransformer3DModel.*isa calibrate"):
        apply_isa(t, prof)
    assert not hasattr(t, "_isa_state")  # nothing half-installed


def test_profile_for_another_config(wan_kit):
    from isa_plugin import apply_isa

    prof = _wan_profile(wan_kit.wan(heads=2))
    other = wan_kit.wan(heads=4)
    with pytest.raises(ValueError, match=r"config hash .* recalibrate"):
        apply_isa(other, prof)


@pytest.mark.parametrize("layers", [1, 3])
def test_profile_for_another_depth(wan_kit, layers):
    from isa_plugin import apply_isa

    t = wan_kit.wan(num_layers=2)
    names = [f"blocks.{i}.attn1" for i in range(layers)]
    prof = ThresholdProfile.uniform(names, SPARSE, calibrated_on={"transformer_class": "WanTransformer3DModel"})
    with pytest.raises(ValueError, match=r"(missing layers|does not have).*(another model|recalibrate)"):
        apply_isa(t, prof)


def test_profile_per_head_ratios_for_another_head_count(wan_kit):
    from isa_plugin import apply_isa

    t = wan_kit.wan(heads=2)
    s = LayerSetting(alpha_s=(0.5, 0.5, 0.5), alpha_f=0.5, alpha_ns=0.25)
    prof = ThresholdProfile(layers={n: [s] for n in NAMES}, block_size=8)
    with pytest.raises(ValueError, match=r"3 per-head values but the attention call has 2 heads"):
        apply_isa(t, prof)


def _saved(tmp_path, per_head=False):
    s = LayerSetting(alpha_s=(0.25, 0.5) if per_head else 0.25, alpha_f=0.5, alpha_ns=0.125, error_target=0.01,
                     error_context=0.02, relative_cost=0.3)
    prof = ThresholdProfile(layers={n: [s] for n in NAMES}, block_size=8,
                            calibrated_on={"transformer_class": "WanTransformer3DModel", "resolution": [64, 64], "frames": 9})
    return prof, prof.save(tmp_path / "profile.yaml")


def test_profile_roundtrip_is_the_baseline(tmp_path):
    prof, path = _saved(tmp_path, per_head=True)
    assert ThresholdProfile.load(path) == prof


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", r"expected a YAML mapping"),
        (b"   \n# only a comment\n", r"expected a YAML mapping"),
        (b"\x00\xff\xfe garbage \x80", r"not a text YAML file"),
        (b"layers: [unclosed\n  budget: {", r"corrupt or truncated YAML"),
        (b"- a\n- list\n", r"expected a YAML mapping"),
        (b"schema_version: 1\nkind: something-else\nlayers: {}\nbudget: {}\n", r"not an ISA threshold profile"),
        (b"kind: isa-threshold-profile\nlayers: {}\n", r"missing 'schema_version'"),
        (b"schema_version: 1\nkind: isa-threshold-profile\nbudget: {metric: rel_l1, target: 0.05, context: 0.05}\n", r"missing 'layers'"),
    ],
    ids=["empty", "comment-only", "binary", "syntax", "list", "other-kind", "no-version", "no-layers"],
)
def test_corrupt_or_empty_profile(tmp_path, content, match):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=match) as e:
        ThresholdProfile.load(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)  # ProfileError is a ValueError: callers catching bad input get it


def test_missing_profile_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ThresholdProfile.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("version", [2, 99, "1", None, 1.5, True])
def test_future_or_bad_schema_version(tmp_path, version):
    import yaml

    _, path = _saved(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["schema_version"] = version
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=r"schema_version"):
        ThresholdProfile.load(path)


def test_future_version_says_upgrade(tmp_path):
    import yaml

    _, path = _saved(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["schema_version"] = 2
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=r"schema_version=2 is not supported .*upgrade isa-plugin"):
        ThresholdProfile.load(path)


@pytest.mark.parametrize("per_head", [False, True])
def test_truncated_profile_never_loads(tmp_path, per_head):
    """Cut the YAML after every line (and mid-line): loading must fail, never yield a partial profile."""
    _, path = _saved(tmp_path, per_head=per_head)
    text = path.read_bytes()
    lines = text.splitlines(keepends=True)
    cuts = sorted({sum(len(x) for x in lines[:i]) for i in range(1, len(lines))} | {len(text) // 2, len(text) - 3})
    cuts = [c for c in cuts if 0 < c < len(text) and text[:c].strip() != text.strip()]
    assert cuts
    for c in cuts:
        path.write_bytes(text[:c])
        with pytest.raises(ProfileError):
            ThresholdProfile.load(path)
            pytest.fail(f"a profile truncated at byte {c}/{len(text)} loaded:\n{text[:c].decode()}")


def test_truncated_or_missing_sidecar(tmp_path):
    _, path = _saved(tmp_path, per_head=True)
    side = path.with_suffix(".safetensors")
    blob = side.read_bytes()
    side.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ProfileError, match="checksum"):
        ThresholdProfile.load(path)
    side.unlink()
    with pytest.raises(ProfileError, match=r"sidecar .* is missing"):
        ThresholdProfile.load(path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("alpha_s", 1.5, r"alpha_s=1.5 is out of range"),
        ("alpha_f", 0, r"alpha_f=0.0 is out of range"),
        ("alpha_ns", -0.25, r"alpha_ns=-0.25 is out of range"),
        ("alpha_s", float("nan"), r"alpha_s=nan is out of range"),
        ("alpha_s", float("inf"), r"alpha_s=inf is out of range"),
        ("alpha_f", "half", r"alpha_f='half' must be a number"),
        ("alpha_ns", True, r"alpha_ns=True must be a number"),
        ("alpha_s", [], r"alpha_s is an empty list"),
        ("alpha_s", [0.5, 2.0], r"alpha_s\[1\]=2.0 is out of range"),
        ("sharpness", "variance", r"sharpness='variance' is not supported"),
        ("error_target", -1.0, r"error_target=-1.0 must be a finite non-negative number"),
        ("bogus_key", 1, r"unknown keys \['bogus_key'\]"),
    ],
)
def test_hand_edited_out_of_range_values(tmp_path, field, value, match):
    import yaml

    _, path = _saved(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["layers"]["blocks.1.attn1"][field] = value
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=match) as e:
        ThresholdProfile.load(path)
    assert "blocks.1.attn1" in str(e.value) and str(path) in str(e.value)


def test_hand_edited_sidecar_out_of_range(tmp_path):
    import hashlib

    import yaml
    from safetensors.torch import load, save

    _, path = _saved(tmp_path, per_head=True)
    side = path.with_suffix(".safetensors")
    tensors = load(side.read_bytes())
    key = next(k for k in tensors if k.endswith("alpha_s"))
    tensors[key] = torch.tensor([0.5, 1.25], dtype=torch.float64)
    blob = save(tensors)
    side.write_bytes(blob)
    doc = yaml.safe_load(path.read_text())
    doc["sidecar"]["sha256"] = hashlib.sha256(blob).hexdigest()  # a consistent hand edit
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=r"alpha_s\[1\]=1.25 is out of range"):
        ThresholdProfile.load(path)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(alpha_s=0.0), ValueError, r"alpha_s=0.0 is out of range; use a value in \(0, 1\]"),
        (dict(alpha_f=1.01), ValueError, r"alpha_f=1.01 is out of range"),
        (dict(alpha_ns=float("nan")), ValueError, r"alpha_ns=nan is out of range"),
        (dict(alpha_s="0.5"), TypeError, r"alpha_s='0.5' must be a number"),
        (dict(block_size=0), ValueError, r"block_size=0 must be a positive integer"),
        (dict(sharpness="var"), ValueError, r"sharpness='var' is not supported; supported"),
        (dict(backend="cuda"), ValueError, r"backend='cuda' is not supported; supported"),
        (dict(share_plan=1), TypeError, r"share_plan=1 must be True or False"),
    ],
)
def test_config_values_out_of_range(kw, exc, match):
    with pytest.raises(exc, match=match):
        ISAConfig(**kw)


# ============================================================================ non-finite inputs
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_non_finite_inputs_behave_like_dense(which, value, backend):
    """No crash; every output dense attention makes non-finite is non-finite; other batch entries and
    heads are untouched. (A non-finite k poisons its whole head, a non-finite v its feature column.)"""
    layout = Layout([("target", 70), ("context", 60), ("text", 5)])
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.3, block_size=16, backend=backend)
    q, k, v = qkv(2, layout.num_tokens, 2, 8, seed=3)
    clean = isa_attention(q, k, v, layout, cfg)
    dict(q=q, k=k, v=v)[which][0, 80, 1, 3] = value
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    assert info.used_isa
    dense = dense_attention(q, k, v)
    bad, bad_dense = ~out.isfinite(), ~dense.isfinite()
    assert bad_dense.any() and not (bad_dense & ~bad).any()
    if which == "q" or not math.isinf(value) or which == "v":
        assert torch.equal(bad, bad_dense)  # same positions (as NaN or ±inf)
    assert torch.equal(out[1], clean[1]) and torch.equal(out[0, :, 0], clean[0, :, 0])
    if which == "q":  # only the poisoned query row
        rows = bad.any(-1).any(-1)[0]
        assert rows.nonzero().flatten().tolist() == [80]


def test_non_finite_through_processor_no_crash(wan_kit):
    """NaN in the latents of one batch entry: the ISA transformer gives NaN exactly where the stock
    transformer does (that entry), counts ISA calls, and the other entry is unchanged."""
    from isa_plugin import stats

    t = wan_kit.wan()
    x = wan_kit.wan_inputs(frames=4, batch=2)
    x["hidden_states"][0, :, 3, 2, 2] = float("nan")
    dense = wan_kit.run(t, x)
    _apply(t, SPARSE)
    out = wan_kit.run(t, x)
    assert torch.equal(out.isnan(), dense.isnan()) and dense[0].isnan().all() and not dense[1].isnan().any()
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(t).values())
    clean = {n: v[1:] for n, v in x.items()}
    assert (out[1:] - wan_kit.run(t, clean)).abs().max().item() <= 1e-5


# ============================================================================ masks, head_dim, dtype, device
def test_attention_mask_falls_back_counted(wan_kit):
    from isa_plugin import stats

    t = wan_kit.wan(num_layers=1)
    attn = t.blocks[0].attn1
    _apply(t, SPARSE)
    proc = attn.processor
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 128, attn.heads * 32, generator=g)
    mask = torch.ones(2, 1, 128, 128, dtype=torch.bool)
    mask[1, :, :, 100:] = False  # padding in the second entry
    proc.layout = Layout([("target", 64), ("context", 64)])
    with torch.no_grad():
        out = attn(hs, attention_mask=mask)
        ref = proc.original(attn, hs, None, mask, None)
    assert torch.equal(out, ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"attention mask present": 1}


def test_unsupported_head_dim_on_cpu_falls_back_counted(wan_kit):
    """head_dim=12 (not a multiple of 8): the stock dense path, counted with a reason naming it."""
    from isa_plugin import stats

    t = wan_kit.wan(num_layers=1, head_dim=12)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    _apply(t, SPARSE)
    assert torch.equal(wan_kit.run(t, x), ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"head_dim=12 not supported (multiples of 8 up to 256)": 1}


class _FakeCuda:
    """Just enough of a CUDA tensor for the eligibility checks (no GPU needed)."""

    is_cuda = True
    device = types.SimpleNamespace(type="cuda", index=0)

    def __init__(self, shape, dtype=torch.bfloat16, unit_stride=True):
        self.shape, self.dtype, self._unit = torch.Size(shape), dtype, unit_stride

    @property
    def ndim(self):
        return len(self.shape)

    def stride(self, dim):
        return 1 if self._unit else 2


@pytest.mark.parametrize(
    "shape,dtype,cfg,match",
    [
        ((1, 256, 2, 96), torch.bfloat16, ISAConfig(), r"head_dim=96 is not supported; supported: 64, 128"),
        ((1, 256, 2, 32), torch.float16, ISAConfig(), r"head_dim=32 is not supported"),
        ((1, 256, 2, 256), torch.float16, ISAConfig(), r"head_dim=256 is not supported"),
        ((1, 256, 2, 128), torch.float64, ISAConfig(), r"dtype torch.float64 is not supported; supported: float16, bfloat16, float32"),
        ((1, 256, 2, 128), torch.bfloat16, ISAConfig(block_size=8), r"block_size=8 is not supported by the kernels; supported"),
    ],
)
def test_kernel_eligibility_names_the_value(shape, dtype, cfg, match):
    from isa_plugin.executors.triton import triton_ineligible

    assert triton_ineligible(_FakeCuda(shape, dtype), cfg) is not None
    assert __import__("re").search(match, triton_ineligible(_FakeCuda(shape, dtype), cfg))


def test_kernel_eligibility_strided_head_dim():
    from isa_plugin.executors.triton import triton_ineligible

    assert "unit stride" in triton_ineligible(_FakeCuda((1, 256, 2, 128), unit_stride=False), ISAConfig())


def test_kernel_eligibility_cpu():
    from isa_plugin.executors.triton import triton_ineligible

    assert "cpu" in triton_ineligible(torch.zeros(1, 4, 1, 64), ISAConfig())


def test_processor_on_cuda_with_unsupported_head_dim_counts_kernel_reason():
    """What a processor does on a CUDA call the kernels cannot take: dense, with the kernels' reason."""
    from isa_plugin.adapters.processor import ISAAttnProcessorBase

    p = ISAAttnProcessorBase(ISAConfig())
    layout = Layout([("target", 128), ("context", 128)])
    route = p.route(_FakeCuda((1, 256, 2, 96)), layout)
    assert route.backend == "dense" and route.reason == "ISA kernels unavailable: head_dim=96 is not supported; supported: 64, 128"
    # the explicit reference backend serves any device
    p.config = ISAConfig(backend="reference")
    assert p.route(_FakeCuda((1, 256, 2, 96)), layout).backend == "reference"


def test_backend_triton_on_cpu_raises_with_reason():
    layout = Layout([("target", 64), ("context", 64)])
    q, k, v = qkv(1, 128, 2, 64)
    with pytest.raises(RuntimeError, match=r"backend='triton' but that executor cannot serve this call: inputs are on cpu"):
        isa_attention(q, k, v, layout, ISAConfig(backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_on_cpu(dtype):
    layout = Layout([("target", 40), ("context", 33)])
    q, k, v = qkv(2, 73, 2, 16, dtype=dtype)
    out = isa_attention(q, k, v, layout, ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=8))
    assert out.dtype == dtype
    ref = dense_attention_reference(q.double(), k.double(), v.double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    assert (out.double() - ref).abs().max().item() <= tol


def test_integer_inputs_raise():
    layout = Layout([("target", 8), ("context", 8)])
    q = torch.ones(1, 16, 1, 8, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating-point"):
        isa_attention(q, q, q, layout)


def test_mismatched_dtypes_and_shapes_raise():
    layout = Layout([("target", 8), ("context", 8)])
    q, k, v = qkv(1, 16, 1, 8)
    with pytest.raises(ValueError, match="dtypes differ.*cast them to one dtype"):
        isa_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match="must share one .*cross-attention"):
        isa_attention(q, k[:, :8], v[:, :8], layout)
    with pytest.raises(ValueError, match=r"expected \[B, N, H, D\]"):
        isa_attention(q[0], k[0], v[0], layout)


# ============================================================================ layouts
@pytest.mark.parametrize("spans", [[("target", 3), ("context", 2)], [("target", 1), ("context", 1)],
                                   [("text", 2), ("target", 5), ("context", 70), ("context", 1)]])
def test_spans_shorter_than_a_block(spans):
    import naive_isa

    layout = Layout(spans)
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.5, block_size=64)
    q, k, v = qkv(2, layout.num_tokens, 2, 8, dtype=torch.float64)
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    assert info.used_isa and torch.isfinite(out).all()
    assert (out - naive_isa.naive_isa(q, k, v, spans, 0.5, 0.5, 0.5, 64)).abs().max().item() <= 1e-10
    exact = isa_attention(q, k, v, layout, cfg.replace(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0))
    assert (exact - dense_attention_reference(q, k, v)).abs().max().item() <= 1e-12


def test_single_block_falls_back_with_reason():
    layout = Layout([("target", 10)])
    q, k, v = qkv(1, 10, 2, 8)
    out, info = isa_attention(q, k, v, layout, ISAConfig(block_size=64), return_info=True)
    assert not info.used_isa and info.backend == "dense" and "fewer than two blocks" in info.reason
    assert (out - dense_attention(q, k, v)).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "spans,match",
    [
        ([("target", 10), ("context", 0)], r"length 0; lengths must be positive \(drop empty spans\)"),
        ([("context", 10)], r"has no 'target' span"),
        ([("target", 10), ("ctx", 5)], r"kind 'ctx'; supported kinds"),
        ([("target", 10.5)], r"length 10.5; lengths must be positive integers"),
        ([("target", 10), ("context", -3)], r"length -3"),
        ([("target",)], r"expected a \(kind, length\) pair"),
    ],
)
def test_bad_layouts_raise(spans, match):
    with pytest.raises(ValueError, match=match):
        Layout(spans)


def test_missing_context_span():
    """No context at all: isa_attention still computes (Taylor over target), exact at all ratios 1;
    the processors treat such a call as not in-context and run dense (counted)."""
    layout = Layout([("target", 100), ("text", 7)])
    q, k, v = qkv(1, 107, 2, 8, dtype=torch.float64)
    out, info = isa_attention(q, k, v, layout, ISAConfig(block_size=16), return_info=True)
    assert info.used_isa and torch.isfinite(out).all()
    exact = isa_attention(q, k, v, layout, ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=16))
    assert (exact - dense_attention_reference(q, k, v)).abs().max().item() <= 1e-12


def test_missing_context_in_processor_counted(wan_kit):
    from isa_plugin import apply_isa, stats

    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    apply_isa(t, SPARSE, layout=Layout([("target", 256)]))
    assert torch.equal(wan_kit.run(t, x), ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"no context tokens (not an in-context call)": 1}


def test_context_frames_covering_the_whole_input_counted(wan_kit):
    """WanICLLayout(context_frames >= frames): no target frame, layout unknown, dense (counted)."""
    from isa_plugin import stats

    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    _apply(t, SPARSE, frames_ctx=4)
    assert torch.equal(wan_kit.run(t, x), ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout unknown": 1}


def test_no_layout_at_all_counted(wan_kit):
    from isa_plugin import apply_isa, stats

    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    apply_isa(t, SPARSE)
    assert torch.equal(wan_kit.run(t, x), ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout unknown": 1}


def test_layout_of_wrong_length_raises_at_entry_point():
    q, k, v = qkv(1, 100, 2, 8)
    with pytest.raises(ValueError, match=r"covers 90 tokens but the attention call has sequence length 100; the span lengths must add up"):
        isa_attention(q, k, v, Layout([("target", 50), ("context", 40)]), ISAConfig(block_size=16))


def test_layout_of_wrong_length_in_processor_counted(wan_kit):
    from isa_plugin import apply_isa, stats

    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)  # 4 frames x 8 x 8 = 256 tokens
    ref = wan_kit.run(t, x)
    apply_isa(t, SPARSE, layout=Layout([("target", 100), ("context", 100)]))
    assert torch.equal(wan_kit.run(t, x), ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout covers 200 tokens, call has 256": 1}


def test_different_layouts_per_batch_entry():
    layouts = [Layout([("target", 70), ("context", 50)]), Layout([("context", 60), ("target", 40), ("text", 20)])]
    cfg = ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.3, block_size=16)
    q, k, v = qkv(2, 120, 2, 8, dtype=torch.float64)
    out, info = isa_attention(q, k, v, layouts, cfg, return_info=True)
    assert info.used_isa
    for i, l in enumerate(layouts):
        assert torch.equal(out[i : i + 1], isa_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], l, cfg))
    # one entry too short for ISA: that entry runs dense, the call reports it
    short = [layouts[0], Layout([("target", 120)])]
    out, info = isa_attention(q, k, v, short, ISAConfig(block_size=128), return_info=True)
    assert not info.used_isa and "fewer than two blocks" in info.reason
    assert (out[1:] - dense_attention(q[1:], k[1:], v[1:])).abs().max().item() <= 1e-12


@pytest.mark.parametrize("bad", [[Layout([("target", 60), ("context", 60)])] * 3, ["not a layout", "x"]])
def test_layout_list_of_wrong_length_raises(bad):
    q, k, v = qkv(2, 120, 2, 8)
    with pytest.raises(ValueError, match=r"a list of 2 of those \(one per batch entry\)"):
        isa_attention(q, k, v, bad)


def test_per_head_ratios_for_wrong_head_count():
    q, k, v = qkv(1, 120, 3, 8)
    with pytest.raises(ValueError, match=r"2 per-head values but the attention call has 3 heads; give 3 values"):
        isa_attention(q, k, v, Layout([("target", 60), ("context", 60)]), ISAConfig(alpha_s=(0.5, 0.5), block_size=16))


# ============================================================================ resolution changes, several pipelines
@pytest.fixture(scope="module")
def calibrated():
    """A tiny WanInContextEditPipeline calibrated at 64x64 px, 9 frames."""
    pytest.importorskip("diffusers")
    from isa_plugin.calibration.recorder import calibrate
    from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline

    preset = TinyPreset(heads=2, head_dim=32, layers=2, height=64, width=64, frames=9, block_size=8, steps=2)
    pipe = build_tiny_wan_icl_pipeline(preset)
    pipe.set_progress_bar_config(disable=True)
    video = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    profile, _ = calibrate(pipe, [video], "edit", budget=0.2, steps=2, calib_steps=1, height=64, width=64, frames=9,
                           block_size=8, blocks_per_kind=8, tokens_per_block=8)
    return pipe, profile


def _edit(pipe, h, w, f):
    video = torch.rand(f, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe("edit", video=video, height=h, width=w, num_frames=f, num_inference_steps=2, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def test_profile_records_calibrated_size(calibrated):
    _, profile = calibrated
    on = profile.calibrated_on
    assert on["resolution"] == [64, 64] and on["frames"] == 9
    assert on["tokens"] == {"target": 48, "context": 48, "text": 0}  # 3 latent frames x 4 x 4 each


@pytest.mark.parametrize("size", [(96, 64, 9), (64, 64, 13)], ids=["resolution", "frames"])
def test_other_resolution_or_frames_warns_and_still_applies(calibrated, size, tmp_path):
    from isa_plugin import apply_isa, remove_isa, stats
    from isa_plugin.adapters import reset_stats

    pipe, profile = calibrated
    profile = ThresholdProfile.load(profile.save(tmp_path / "p.yaml"))  # what users do: save, load, apply
    apply_isa(pipe, profile)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the calibrated size does not warn
            _edit(pipe, 64, 64, 9)
        reset_stats(pipe)
        with pytest.warns(UserWarning, match=r"calibrated at 64x64 px, 9 frames = 48 target \+ 48 context tokens .* consider recalibrating"):
            out = _edit(pipe, *size)
        assert torch.isfinite(out).all()
        s = stats(pipe)
        assert any(not ss[0].dense for ss in profile.layers.values())
        for n, v in s.items():
            if profile.layers[n][0].dense:
                assert v == counters(fallbacks={"layer left dense (no config)": 2})
            else:  # ISA ran at the new size (2 steps, no CFG)
                assert v == counters(2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per size, not per call
            _edit(pipe, *size)
    finally:
        remove_isa(pipe)


def test_two_transformers_with_different_profiles_in_one_process(wan_kit):
    """Two models, two profiles: each keeps its own settings and counters; interleaved calls give what
    each gives alone; a profile cannot be applied to the other model."""
    from isa_plugin import apply_isa, remove_isa, stats
    from isa_plugin.adapters import isa_processors
    from isa_plugin.adapters.families.wan import WanICLLayout

    a, b = wan_kit.wan(heads=2, seed=0), wan_kit.wan(heads=4, head_dim=16, seed=1)
    pa = ThresholdProfile.uniform(NAMES, ISAConfig(alpha_s=0.25, alpha_f=0.25, alpha_ns=0.125, block_size=8),
                                  calibrated_on={"transformer_class": "WanTransformer3DModel", "config_hash": config_hash(a)})
    pb = ThresholdProfile(layers={NAMES[0]: [LayerSetting(alpha_s=(1.0, 0.5, 0.5, 1.0), alpha_f=0.75, alpha_ns=0.5)],
                                  NAMES[1]: [LayerSetting(dense=True)]}, block_size=16,
                          calibrated_on={"transformer_class": "WanTransformer3DModel", "config_hash": config_hash(b)})
    with pytest.raises(ValueError, match="config hash"):
        apply_isa(a, pb)
    x = wan_kit.wan_inputs(frames=4)
    solo = {}
    for m, p in ((a, pa), (b, pb)):
        apply_isa(m, p, layout=WanICLLayout(2))
        solo[id(m)] = wan_kit.run(m, x)
        remove_isa(m)
    apply_isa(a, pa, layout=WanICLLayout(2))
    apply_isa(b, pb, layout=WanICLLayout(2))
    for _ in range(2):
        assert torch.equal(wan_kit.run(b, x), solo[id(b)])
        assert torch.equal(wan_kit.run(a, x), solo[id(a)])
    assert isa_processors(a)["blocks.0.attn1"].config.block_size == 8
    assert isa_processors(b)["blocks.0.attn1"].config.alpha_s == (1.0, 0.5, 0.5, 1.0)
    assert stats(a)["blocks.1.attn1"] == counters(2)
    assert stats(b)["blocks.1.attn1"] == counters(fallbacks={"layer left dense (no config)": 2})


def test_two_pipelines_with_different_profiles_in_one_process(calibrated, wan_kit):
    """Two ICL pipelines, one with its calibrated profile, one with a uniform profile of another shape."""
    from isa_plugin import apply_isa, remove_isa, stats
    from isa_plugin.pipelines.tiny import TinyPreset, build_tiny_wan_icl_pipeline

    pipe_a, prof_a = calibrated
    pipe_b = build_tiny_wan_icl_pipeline(TinyPreset(heads=4, head_dim=16, layers=3, height=64, width=64, frames=9, block_size=16, steps=2), seed=3)
    pipe_b.set_progress_bar_config(disable=True)
    names_b = [f"blocks.{i}.attn1" for i in range(3)]
    prof_b = ThresholdProfile.uniform(names_b, ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, block_size=16),
                                      calibrated_on={"transformer_class": "WanTransformer3DModel", "config_hash": config_hash(pipe_b.transformer)})
    with pytest.raises(ValueError, match="config hash"):
        apply_isa(pipe_b, prof_a)
    with pytest.raises(ValueError):
        apply_isa(pipe_a, prof_b)
    alone = {}
    for p, prof in ((pipe_a, prof_a), (pipe_b, prof_b)):
        apply_isa(p, prof)
        alone[id(p)] = _edit(p, 64, 64, 9)
        remove_isa(p)
    apply_isa(pipe_a, prof_a)
    apply_isa(pipe_b, prof_b)
    try:
        for p in (pipe_b, pipe_a, pipe_b):
            assert torch.equal(_edit(p, 64, 64, 9), alone[id(p)])
        assert set(stats(pipe_b)) == set(names_b) and all(s["isa_calls"] == 4 for s in stats(pipe_b).values())
        assert set(stats(pipe_a)) == set(NAMES)
    finally:
        remove_isa(pipe_a)
        remove_isa(pipe_b)


def test_profile_without_recorded_size_does_not_warn(wan_kit):
    from isa_plugin import apply_isa, stats
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = wan_kit.wan()
    apply_isa(t, _wan_profile(t), layout=WanICLLayout(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for frames, size in ((4, 16), (6, 24)):
            wan_kit.run(t, wan_kit.wan_inputs(frames=frames, size=size))
    assert stats(t)["blocks.0.attn1"]["isa_calls"] == 2


class _RaisingProvider:
    def __call__(self, transformer, arguments):
        raise KeyError("no such argument")


class _GarbageProvider:
    def __call__(self, transformer, arguments):
        return "target then context"


@pytest.mark.parametrize(
    "spec",
    [lambda n: 1 / 0, lambda n: "garbage", lambda n: [("target", n)], "raising-provider", "garbage-provider"],
    ids=["callable-raises", "callable-returns-str", "callable-returns-list", "provider-raises", "provider-returns-str"],
)
def test_broken_layout_callables_and_providers_run_dense_counted(wan_kit, spec, caplog):
    """A user's layout callable or provider that fails never breaks generation: dense, counted, logged."""
    from isa_plugin import apply_isa, stats
    from isa_plugin.adapters.context import LayoutProvider

    if spec == "raising-provider":
        spec = type("P", (_RaisingProvider, LayoutProvider), {})()
    elif spec == "garbage-provider":
        spec = type("P", (_GarbageProvider, LayoutProvider), {})()
    t = wan_kit.wan(num_layers=1)
    x = wan_kit.wan_inputs(frames=4)
    ref = wan_kit.run(t, x)
    apply_isa(t, SPARSE, layout=spec)
    with caplog.at_level("WARNING", logger="isa_plugin"):
        out = wan_kit.run(t, x)
    assert torch.equal(out, ref)
    assert stats(t)["blocks.0.attn1"]["reasons"] == {"layout unknown": 1}
    assert "this call runs dense attention" in caplog.text


def test_dtype_changed_after_apply(wan_kit):
    """apply_isa, then the model is cast to bfloat16: ISA keeps serving (thresholds are plain attributes)."""
    from isa_plugin import apply_isa, stats

    t = wan_kit.wan()
    x = wan_kit.wan_inputs(frames=4)
    dense = wan_kit.run(t, x)
    _apply(t, EXACT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers warns about casting fp32-kept modules
        t.to(torch.bfloat16)
    xb = {n: (v.to(torch.bfloat16) if v.is_floating_point() else v) for n, v in x.items()}
    out = wan_kit.run(t, xb)
    assert out.dtype == torch.bfloat16 and (out.float() - dense).abs().max().item() < 0.1
    assert all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats(t).values())
