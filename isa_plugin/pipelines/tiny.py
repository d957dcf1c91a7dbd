"""Small randomly initialised pipelines of every supported family (no downloads), for the demo and tests.

Every component is built from a config (no vocabulary files: byte-level tokenizers, or no text encoder).
:func:`build_tiny_wan_icl_pipeline` sizes a ``WanInContextEditPipeline`` by a preset (UMT5 text encoder,
small Wan VAE, flow-matching scheduler, Wan transformer): what the presets exercise is the machinery
(layouts, calibration, kernels, timing) at realistic token counts. :func:`build_tiny_pipeline` gives every
registered family a CPU-sized pipeline that ``isa calibrate`` runs on the bundled samples. Weights are
random, so the edits are noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch

__all__ = ["TinyPreset", "PRESETS", "build_tiny_wan_icl_pipeline", "build_tiny_pipeline", "TINY_FAMILIES"]


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


def build_tiny_wan_icl_pipeline(preset: TinyPreset, *, seed: int = 0, device="cpu", dtype=torch.float32, two_experts: bool = False):
    """A ``WanInContextEditPipeline`` with random weights sized by ``preset``.

    Args:
        preset: a :class:`TinyPreset` (e.g. ``PRESETS["tiny"]``).
        seed: weight initialisation seed.
        device, dtype: where the transformer runs (the VAE and text encoder stay in float32).
        two_experts: also build ``transformer_2`` (Wan 2.2's low-noise expert; boundary ratio 0.9, so that
            short schedules reach it).

    Returns:
        the pipeline, moved to ``device``.

    Example:
        >>> pipe = build_tiny_wan_icl_pipeline(PRESETS["tiny"])
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer

    from .wan_icl import WanInContextEditPipeline

    if not isinstance(preset, TinyPreset):
        raise TypeError(f"preset must be a TinyPreset (see PRESETS: {sorted(PRESETS)}), got {type(preset).__name__}")
    torch.manual_seed(seed)
    text_dim = 32
    text_encoder, vae = _tiny_wan_text_encoder_and_vae(text_dim)
    inner = preset.heads * preset.head_dim

    def expert():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=preset.heads, attention_head_dim=preset.head_dim,
            in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=64, ffn_dim=2 * inner,
            num_layers=preset.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ).eval()

    transformer = expert()
    pipe = WanInContextEditPipeline(
        tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
        transformer_2=expert() if two_experts else None, boundary_ratio=0.9 if two_experts else None,
    )
    pipe.to(device)
    if dtype != torch.float32:
        pipe.transformer.to(dtype)
    return pipe


def _tiny_wan_text_encoder_and_vae(text_dim: int):
    """A 2-layer UMT5 encoder of width ``text_dim`` (byte-level tokens) and a small Wan VAE (8x spatial, 4x temporal)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=384, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False, tie_word_embeddings=False)
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return text_encoder, vae


# ------------------------------------------------------------------------------------ every family
def _tiny_liveditor(seed: int):
    from transformers import ByT5Tokenizer

    from .liveditor import LIVEditorTransformer3DModel
    from .liveditor_pipeline import LIVEditorPipeline, liveditor_scheduler

    torch.manual_seed(seed)
    text_dim = 32
    text_encoder, vae = _tiny_wan_text_encoder_and_vae(text_dim)
    transformer = LIVEditorTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=1024,
    ).eval()
    return LIVEditorPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=liveditor_scheduler(),
                             transformer=transformer)


def _tiny_ltx_condition(seed: int):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXConditionPipeline, LTXVideoTransformer3DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    ).eval()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64, num_layers=2,
        qk_norm="rms_norm_across_heads", caption_channels=32,
    ).eval()
    tokenizer = ByT5Tokenizer()
    tokenizer.model_max_length = 16
    return LTXConditionPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer, transformer=transformer)


#: downsampling of each level of the tiny LTX-2 VAE, by its compression factor (spatial and temporal alike)
_LTX2_VAE_LEVELS = {8: ("spatiotemporal", "spatiotemporal", "spatial"), 2: ("spatial",)}


def _tiny_ltx2_in_context(seed: int, vae_compression: int = 8):
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2InContextPipeline,
                           LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=32, rope_double_precision=False, rope_type="split",
    ).eval()
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    ).eval()
    if vae_compression not in _LTX2_VAE_LEVELS:
        raise ValueError(f"vae_compression={vae_compression!r} is not supported for ltx2; supported: {sorted(_LTX2_VAE_LEVELS)}")
    levels = len(_LTX2_VAE_LEVELS[vae_compression])
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
        layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * (levels + 1), spatio_temporal_scaling=(True,) * levels,
        decoder_spatio_temporal_scaling=(True,) * levels, decoder_inject_noise=(False,) * (levels + 1),
        downsample_type=_LTX2_VAE_LEVELS[vae_compression], upsample_residual=(False,) * levels,
        upsample_factor=(1,) * levels, timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
        decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    ).eval()
    return LTX2InContextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )


def _tiny_framepack(seed: int, layers: int = 1, single_layers: int = 1):
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline,
                           HunyuanVideoFramepackTransformer3DModel)
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(8, 12, 12), image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    ).eval()
    encoder = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=16, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).eval()
    return HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=None, tokenizer_2=None, image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )


def _tiny_flux_kontext(seed: int, layers: int = 1, single_layers: int = 1):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12],
    ).eval()
    return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)


#: the QwenImage edit pipelines the tiny builder makes (the same components)
_QWEN_EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def _tiny_qwen_image_edit(seed: int, pipeline: str = "QwenImageEditPipeline"):
    import diffusers as d

    if pipeline not in _QWEN_EDIT_PIPELINES:
        raise ValueError(f"pipeline={pipeline!r} is not supported for qwenimage; supported: {', '.join(_QWEN_EDIT_PIPELINES)}")
    torch.manual_seed(seed)
    # 16x spatial: the ~1024^2 condition image becomes 64x64 latents (32x32 tokens); two channels keep its
    # full-resolution encode (every run resizes the condition image to ~1024^2) near one second on a CPU
    vae = d.AutoencoderKLQwenImage(
        base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, False, False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    transformer = d.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    ).eval()
    return getattr(d, pipeline)(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                processor=None, transformer=transformer)


#: family adapter name -> builder of its tiny pipeline (``isa_plugin.adapters.registered_families`` names)
TINY_FAMILIES = {
    "wan": lambda seed, **kw: build_tiny_wan_icl_pipeline(PRESETS["tiny"], seed=seed, **kw),
    "ltx": _tiny_ltx_condition,
    "ltx2": _tiny_ltx2_in_context,
    "framepack": _tiny_framepack,
    "flux": _tiny_flux_kontext,
    "qwenimage": _tiny_qwen_image_edit,
    "liveditor": _tiny_liveditor,
}


def build_tiny_pipeline(family: str, *, seed: int = 0, **options):
    """A random-weight CPU pipeline of ``family`` that ``isa calibrate`` runs on the bundled sample media.

    Every component is built from a config (no downloads); transformers have head_dim 32 and one or two
    layers per block kind. Pipelines whose text encoders cannot be built without vocabulary files are
    saved without them (``text_encoder=None``): calibration then uses stand-in prompt embeddings.

    Args:
        family: a registered family adapter name: ``wan`` (WanInContextEditPipeline), ``ltx``
            (LTXConditionPipeline), ``ltx2`` (LTX2InContextPipeline), ``framepack``
            (HunyuanVideoFramepackPipeline), ``flux`` (FluxKontextPipeline), ``qwenimage`` (QwenImageEditPipeline),
            ``liveditor`` (LIVEditorPipeline).
        seed: weight initialisation seed.
        **options: family options: ``wan``: ``two_experts=True`` adds Wan 2.2's ``transformer_2``; ``flux`` and
            ``framepack``: ``layers`` and ``single_layers`` (dual- and single-stream blocks, default 1 each);
            ``ltx2``: ``vae_compression`` 8 (default, spatial and temporal) or 2 (a one-level VAE, for short
            small videos); ``qwenimage``: ``pipeline`` ``"QwenImageEditPipeline"`` (default) or
            ``"QwenImageEditPlusPipeline"``.

    Returns:
        the pipeline on the CPU, float32; ``save_pretrained`` writes it.

    Raises:
        ValueError: an unknown family (lists the known ones), or an unsupported option value (lists the supported ones).

    Example:
        >>> build_tiny_pipeline("ltx2").save_pretrained("tiny-ltx2")   # then: isa calibrate --pipeline tiny-ltx2 --out p.yaml
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"family={family!r} has no tiny pipeline; available: {', '.join(TINY_FAMILIES)}")
    pipe = TINY_FAMILIES[family](seed, **options)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
