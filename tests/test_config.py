"""Layout and ISAConfig validation, serialisation and the isa_attention entry point."""

import pytest
import torch

from isa_plugin import ISAConfig, Layout, isa_attention
from isa_plugin.executors.reference import isa_attention_reference
from isa_plugin.kernels.reference import dense_attention_reference


@pytest.mark.parametrize(
    "spans, match",
    [
        ([("context", 10)], "no 'target' span"),
        ([], "no 'target' span"),
        ([("target", 0)], "length 0"),
        ([("target", -3)], "length -3"),
        ([("target", 2.5)], "positive integers"),
        ([("target", 4), ("image", 4)], "kind 'image'"),
        ([("target",)], "pair"),
    ],
)
def test_invalid_layouts(spans, match):
    with pytest.raises(ValueError, match=match):
        Layout(spans)


def test_layout_basics():
    layout = Layout([("text", 5), ("target", 130), ("context", 64), ("context", 3)])
    assert layout.num_tokens == 202 and layout.num("context") == 67
    b = layout.blocks(64)
    assert b.counts.tolist() == [5, 64, 64, 2, 64, 3]
    assert b.kinds.tolist() == [2, 0, 0, 0, 1, 1]
    assert b.spans.tolist() == [0, 1, 1, 1, 2, 3]
    assert Layout.from_list(layout.to_list()) == layout
    with pytest.raises(ValueError, match="sequence length 200"):
        layout.check(200)
    with pytest.raises(ValueError, match="block_size=0"):
        layout.blocks(0)


def test_config_validation_and_round_trip():
    cfg = ISAConfig()
    assert (cfg.alpha_s, cfg.alpha_f, cfg.alpha_ns, cfg.block_size, cfg.sharpness) == (0.125, 0.5, 0.0625, 64, "topk_mass")
    per_head = ISAConfig(alpha_s=[0.1, 0.2], alpha_f=0.5, sharpness="l2")
    assert per_head.alpha_s == (0.1, 0.2)
    assert ISAConfig.from_dict(per_head.to_dict()) == per_head
    assert ISAConfig(alpha_s=1, alpha_f=1, alpha_ns=1).is_dense and not cfg.is_dense
    for bad, exc, match in [
        (dict(alpha_s=0.0), ValueError, r"alpha_s=0.0 is out of range"),
        (dict(alpha_f=1.5), ValueError, r"alpha_f=1.5 is out of range"),
        (dict(alpha_ns=float("nan")), ValueError, "alpha_ns"),
        (dict(alpha_s="half"), TypeError, "alpha_s='half'"),
        (dict(alpha_s=[]), ValueError, "empty"),
        (dict(alpha_f=[0.5, 2.0]), ValueError, r"alpha_f\[1\]=2.0"),
        (dict(block_size=0), ValueError, "block_size=0"),
        (dict(sharpness="variance"), ValueError, "sharpness='variance'"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
    ]:
        with pytest.raises(exc, match=match):
            ISAConfig(**bad)
    with pytest.raises(ValueError, match="unknown ISAConfig keys"):
        ISAConfig.from_dict({"alpha": 0.5})


def test_per_head_length_mismatch_raises_at_call():
    q = torch.randn(1, 128, 3, 8)
    with pytest.raises(ValueError, match="2 per-head values but the attention call has 3 heads"):
        isa_attention(q, q, q, Layout([("target", 64), ("context", 64)]), ISAConfig(alpha_s=[0.5, 0.5], block_size=16))


def test_entry_point_errors():
    q = torch.randn(1, 128, 2, 8)
    layout = Layout([("target", 64), ("context", 64)])
    with pytest.raises(ValueError, match="covers 128 tokens but the attention call has sequence length 100"):
        isa_attention(q[:, :100], q[:, :100], q[:, :100], layout)
    with pytest.raises(ValueError, match="must share one"):
        isa_attention(q, q[:, :64], q[:, :64], layout)
    with pytest.raises(ValueError, match="expected \\[B, N, H, D\\]"):
        isa_attention(q[0], q[0], q[0], layout)
    with pytest.raises(ValueError, match="dtypes differ"):
        isa_attention(q, q.double(), q, layout)
    with pytest.raises(TypeError, match="config must be an ISAConfig"):
        isa_attention(q, q, q, layout, {"alpha_s": 0.5})
    with pytest.raises(ValueError, match="list of 1 of those"):
        isa_attention(q, q, q, [layout, layout])


def test_entry_point_runs_reference_and_falls_back():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 128, 2, 16) for _ in range(3))
    layout = Layout([("target", 64), ("context", 64)])
    cfg = ISAConfig(block_size=16)
    out, info = isa_attention(q, k, v, layout, cfg, return_info=True)
    assert info.used_isa and info.backend == "reference" and info.reason is None
    assert torch.equal(out, isa_attention_reference(q, k, v, layout, cfg))
    # a single block: nothing to sparsify, dense fallback with a reason
    small = Layout([("target", 10)])
    out, info = isa_attention(q[:, :10], k[:, :10], v[:, :10], small, cfg, return_info=True)
    assert not info.used_isa and "fewer than two blocks" in info.reason
    assert torch.allclose(out, dense_attention_reference(q[:, :10], k[:, :10], v[:, :10]), atol=1e-5)


def test_per_entry_layouts():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 96, 2, 8) for _ in range(3))
    la, lb = Layout([("target", 48), ("context", 48)]), Layout([("context", 32), ("target", 64)])
    cfg = ISAConfig(block_size=16)
    out = isa_attention(q, k, v, [la, lb], cfg)
    assert torch.equal(out[0:1], isa_attention(q[0:1], k[0:1], v[0:1], la, cfg))
    assert torch.equal(out[1:2], isa_attention(q[1:2], k[1:2], v[1:2], lb, cfg))


def test_layout_as_plain_pairs_and_transposed_inputs():
    """A list of (kind, length) pairs is a layout; [B, H, N, D] inputs are named as such in the error."""
    from isa_plugin import isa_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 16) for _ in range(3))
    pairs = [("target", 64), ("context", 64)]
    cfg = ISAConfig(block_size=16)
    assert torch.equal(isa_attention(q, k, v, pairs, cfg), isa_attention(q, k, v, Layout(pairs), cfg))
    with pytest.raises(ValueError, match=r"looks like \[B, H, N, D\].*transpose\(1, 2\)"):
        isa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pairs, cfg)
    with pytest.raises(TypeError, match=r"list of \(kind, length\) pairs"):
        isa_attention(q, k, v, "target", cfg)
