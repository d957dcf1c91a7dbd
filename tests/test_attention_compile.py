"""torch.compile sees ISA as one opaque op: no graph breaks, same result as eager."""

import torch

from isa_plugin import ISAConfig, Layout, isa_attention


class _Block(torch.nn.Module):
    def __init__(self, layout, cfg):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.layout, self.cfg = layout, cfg

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.proj(x).view(B, N, 3, 2, 8).unbind(2)
        return isa_attention(q, k, v, self.layout, self.cfg).flatten(2)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = _Block(Layout([("target", 96), ("context", 64), ("text", 7)]), ISAConfig(block_size=16)).eval()
    x = torch.randn(2, 167, 16)
    with torch.no_grad():
        eager = m(x)
        explain = torch._dynamo.explain(m)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(m, fullgraph=True)(x)
    assert (compiled - eager).abs().max().item() < 1e-5
