"""Small randomly initialised ``WanInContextEditPipeline`` builds (no downloads), for the demo and tests.

Every component is built from a config: a UMT5 text encoder with a byte-level tokenizer (no vocabulary
files), a small Wan VAE, a flow-matching scheduler and a Wan transformer whose width is set by the
preset. Weights are random, so the edits are noise; what the presets exercise is the machinery (layouts,
calibration, kernels, timing) at realistic token counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch

__all__ = ["TinyPreset", "PRESETS", "build_tiny_wan_icl_pipeline"]


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a random ``WanInContextEditPipeline`` and of the video it edits.

    Attributes:
        heads, head_dim, layers: transformer width and depth.
        height, width, frames: the video (pixels; frames = 1 + 4k).
        block_size: ISA block size used with this preset.
        steps: denoising steps of the demo.
    """

    heads: int
    head_dim: int
    layers: int
    height: int
    width: int
    frames: int
    block_size: int
    steps: int

    def tokens_per_video(self) -> int:
        """Self-attention tokens of one video: latent frames x (H/16) x (W/16)."""
        return ((self.frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


#: ``tiny`` runs on a CPU in about a minute; ``small`` and ``large`` are for a GPU (``large`` is the
#: token count of a Wan 480p 81-frame edit: 2 x 32,760 tokens).
PRESETS: Dict[str, TinyPreset] = {
    "tiny": TinyPreset(heads=2, head_dim=32, layers=2, height=96, width=96, frames=17, block_size=16, steps=6),
    "small": TinyPreset(heads=8, head_dim=64, layers=4, height=256, width=256, frames=33, block_size=64, steps=8),
    "large": TinyPreset(heads=12, head_dim=128, layers=4, height=480, width=832, frames=81, block_size=64, steps=6),
}


def build_tiny_wan_icl_pipeline(preset: TinyPreset, *, seed: int = 0, device="cpu", dtype=torch.float32):
    """A ``WanInContextEditPipeline`` with random weights sized by ``preset``.

    Args:
        preset: a :class:`TinyPreset` (e.g. ``PRESETS["tiny"]``).
        seed: weight initialisation seed.
        device, dtype: where the transformer runs (the VAE and text encoder stay in float32).

    Returns:
        the pipeline, moved to ``device``.

    Example:
        >>> pipe = build_tiny_wan_icl_pipeline(PRESETS["tiny"])
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from .wan_icl import WanInContextEditPipeline

    if not isinstance(preset, TinyPreset):
        raise TypeError(f"preset must be a TinyPreset (see PRESETS: {sorted(PRESETS)}), got {type(preset).__name__}")
    torch.manual_seed(seed)
    text_dim = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=384, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False, tie_word_embeddings=False)
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    inner = preset.heads * preset.head_dim
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=preset.heads, attention_head_dim=preset.head_dim,
        in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=64, ffn_dim=2 * inner,
        num_layers=preset.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ).eval()
    pipe = WanInContextEditPipeline(
        tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
    )
    pipe.to(device)
    if dtype != torch.float32:
        pipe.transformer.to(dtype)
    return pipe
