"""A randomly initialised Wan transformer of a given shape for the GPU benchmarks (no weights are read)."""

from __future__ import annotations

import torch


def build_wan_transformer(*, heads: int, head_dim: int, ffn: int, layers: int, text_dim: int, device, dtype, model_cls=None):
    """``WanTransformer3DModel`` (or ``model_cls``, a subclass taking its config, e.g. LIVEditor's) with random
    weights created directly in ``dtype`` on ``device``.

    As ``from_pretrained(torch_dtype=...)`` does, the model's ``_keep_in_fp32_modules`` stay in float32.
    Creating the weights in ``dtype`` avoids a float32 copy of a 14B-parameter model.
    """
    from diffusers import WanTransformer3DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (model_cls or WanTransformer3DModel)(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
            )
    finally:
        torch.set_default_dtype(prev)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep & set(name.split(".")):
                p.data = p.data.float()
    return model.eval().requires_grad_(False)
