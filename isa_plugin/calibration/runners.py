"""Calibration runners: how to call each supported pipeline on one calibration sample.

One :class:`CalibrationRunner` per pipeline adapter (``isa calibrate --adapter NAME``), registered here with
:func:`register_runner` and looked up by the pipeline's class (:func:`runner_for`). A runner says what one
sample is for the pipeline (a source video, reference frames, a keyframe video, a conditioning image), how
to round its size to what the model takes, and makes the pipeline call (prompt, steps, size) that the
recorder observes; :meth:`CalibrationRunner.generate` makes the same call and returns the decoded result
(``isa edit``). ``tests/calibration/test_runners.py`` fails when a registered pipeline adapter has no
runner here.

A sample is always read as frames ``[F, 3, H, W]`` in [0, 1] (a video file, an image, or a folder of
frames); image pipelines take its first frame. Pipelines saved without a text encoder (``text_encoder``
None) get prompt embeddings drawn from a generator seeded by the prompt text — enough for the attention
statistics of random-weight test pipelines, logged as a warning since they carry no meaning.

This module imports nothing heavy at import time (``isa calibrate --help`` lists :data:`RUNNERS`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["CalibrationRunner", "register_runner", "runner_for", "runner_named", "registered_runners", "help_text", "RUNNERS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationRunner:
    """How to call the pipelines of one adapter on a calibration sample.

    Attributes:
        adapter: the pipeline adapter's name (``isa calibrate --adapter``).
        pipeline_classes: pipeline class names served (matched along the MRO).
        inputs: what one sample is for these pipelines (shown by ``isa calibrate --help``).
        media: ``"video"`` (the frames are used) or ``"image"`` (the first frame is used).
        call: ``call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent",
            **extra)`` runs the pipeline once (``sample`` [F, 3, H, W] in [0, 1]) and returns the pipeline's
            output (calibration ignores it; :meth:`generate` asks for ``output_type="np"``).
        spatial_multiple: ``pipe -> int``, the pixel multiple height and width are rounded down to.
        temporal_factor: ``pipe -> int``; video frame counts are trimmed to 1 + k·factor.
    """

    adapter: str
    pipeline_classes: Tuple[str, ...]
    inputs: str
    media: str
    call: Callable[..., Any] = field(repr=False)
    spatial_multiple: Callable[[Any], int] = field(repr=False, default=lambda pipe: 16)
    temporal_factor: Callable[[Any], int] = field(repr=False, default=lambda pipe: 1)

    def __post_init__(self):
        if self.media not in ("video", "image"):
            raise ValueError(f"media={self.media!r}; use 'video' or 'image'")

    def prepare(self, pipe, frames, *, height: Optional[int] = None, width: Optional[int] = None,
                num_frames: Optional[int] = None):
        """The sample as the pipeline takes it: (sample [F, 3, H, W], height, width, frames).

        Resizes to ``height`` x ``width`` when given, keeps the first ``num_frames`` frames (video) or the
        first frame (image), trims a video to 1 + k·(temporal factor) frames and rounds the size down to the
        spatial multiple.

        Raises:
            ValueError: a video shorter than ``num_frames``.
        """
        import torch

        if self.media == "image":
            frames = frames[:1]
        elif num_frames is not None:
            if frames.shape[0] < num_frames:
                raise ValueError(f"a sample has {frames.shape[0]} frames; --frames {num_frames} were asked for")
            frames = frames[:num_frames]
        else:
            t = max(1, int(self.temporal_factor(pipe)))
            frames = frames[: (frames.shape[0] - 1) // t * t + 1]
        mult = max(1, int(self.spatial_multiple(pipe)))
        h, w = height or frames.shape[-2], width or frames.shape[-1]
        h, w = max(mult, h // mult * mult), max(mult, w // mult * mult)
        if (h, w) != tuple(frames.shape[-2:]):
            logger.info("resizing calibration sample from %dx%d to %dx%d (multiples of %d)", *frames.shape[-2:], h, w, mult)
            frames = torch.nn.functional.interpolate(frames, size=(h, w), mode="bilinear", antialias=True,
                                                     align_corners=False).clamp(0, 1)
        return frames, int(h), int(w), int(frames.shape[0])

    def generate(self, pipe, sample, prompt, *, height: int, width: int, num_frames: int, steps: int, generator=None,
                 **extra):
        """Run the pipeline once on ``sample`` and return its result decoded to pixels.

        The call calibration makes (:attr:`call`), with ``output_type="np"``.

        Args:
            pipe: a pipeline this runner serves.
            sample: [F, 3, H, W] in [0, 1], as :meth:`prepare` returns it.
            prompt: the edit instruction.
            height, width, num_frames: the output size (from :meth:`prepare`; ``num_frames`` is the output
                length of an image-to-video pipeline).
            steps: denoising steps.
            generator: a ``torch.Generator`` (None: unseeded).
            **extra: further pipeline keywords (e.g. ``guidance_scale``).

        Returns:
            [F, 3, H', W'] float32 in [0, 1] on the CPU: the frames of a video pipeline, or one frame (F = 1)
            for an image pipeline.

        Raises:
            TypeError: the pipeline's output holds neither ``frames`` nor ``images``.

        Example:
            >>> sample, h, w, f = runner.prepare(pipe, read_video("in.mp4"))
            >>> frames = runner.generate(pipe, sample, "make it winter", height=h, width=w, num_frames=f, steps=30)
        """
        import numpy as np
        import torch

        out = self.call(pipe, sample, prompt, height=height, width=width, num_frames=num_frames, steps=steps,
                        generator=generator, output_type="np", **extra)
        frames = getattr(out, "frames", None)
        if frames is None and getattr(out, "images", None) is not None:
            frames = np.asarray(out.images[0])[None]  # [1, H, W, C]
        elif frames is not None:
            frames = np.asarray(frames[0])  # [F, H, W, C]
        else:
            raise TypeError(f"{type(pipe).__name__} returned {type(out).__name__}, which holds neither frames nor images")
        if frames.ndim != 4:
            raise TypeError(f"{type(pipe).__name__} returned frames of shape {frames.shape}; expected [F, H, W, C]")
        return torch.from_numpy(frames.astype(np.float32)).permute(0, 3, 1, 2)[:, :3].clamp(0, 1).contiguous()


RUNNERS: Dict[str, CalibrationRunner] = {}


def register_runner(runner: CalibrationRunner) -> CalibrationRunner:
    """Register ``runner`` under its adapter name (replacing an earlier one); returns it."""
    if not isinstance(runner, CalibrationRunner):
        raise TypeError(f"register_runner expects a CalibrationRunner, got {type(runner).__name__}")
    RUNNERS[runner.adapter] = runner
    return runner


def registered_runners() -> Dict[str, CalibrationRunner]:
    """Adapter name -> :class:`CalibrationRunner`."""
    return dict(RUNNERS)


def runner_named(adapter: str) -> CalibrationRunner:
    """The runner of adapter ``adapter``.

    Raises:
        ValueError: no runner of that name (lists the known ones).
    """
    if adapter not in RUNNERS:
        raise ValueError(f"no calibration runner for adapter {adapter!r}; available: {', '.join(sorted(RUNNERS))}")
    return RUNNERS[adapter]


def runner_for(pipe) -> CalibrationRunner:
    """The runner serving ``pipe``'s class (or its nearest registered base class).

    Raises:
        TypeError: no runner serves the pipeline (lists the supported pipeline classes).

    Example:
        >>> runner_for(pipe).adapter
        'wan-icl'
    """
    by_class = {c: r for r in RUNNERS.values() for c in r.pipeline_classes}
    for cls in type(pipe).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    raise TypeError(f"no calibration runner for {type(pipe).__name__}; supported pipelines: {', '.join(sorted(by_class))}")


def help_text() -> str:
    """One line per runner, ``  adapter (pipelines): what a sample is``, for ``isa calibrate --help``.

    Example:
        >>> print(help_text().splitlines()[0])
          wan-icl (WanInContextEditPipeline): a source video (the edit's context); ...
    """
    return "\n".join(f"  {r.adapter} ({', '.join(r.pipeline_classes)}): {r.inputs}" for r in RUNNERS.values())


# ------------------------------------------------------------------------------------ shared helpers
def _pil(frame):
    """[3, H, W] in [0, 1] -> a PIL image."""
    from PIL import Image

    return Image.fromarray((frame.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())


def _has_text_encoder(pipe) -> bool:
    return getattr(pipe, "text_encoder", None) is not None


def _embeddings(prompt: str, *shapes, tokens: int = 8):
    """Deterministic stand-in prompt embeddings (seeded by the prompt): one tensor per width in ``shapes``."""
    import torch

    logger.warning("the pipeline has no text encoder: using stand-in prompt embeddings drawn from the prompt's hash "
                   "(the prompt's words have no effect)")
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return [torch.randn(1, tokens, d, generator=g) if tok else torch.randn(1, d, generator=g) for d, tok in shapes]


def _vae_ratio(pipe, attr: str, default: int) -> int:
    return int(getattr(pipe, attr, None) or default)


def _patch(pipe) -> int:
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    return int(patch[-1]) if isinstance(patch, (list, tuple)) else int(patch or 1)


# ------------------------------------------------------------------------------------ wan
def _wan_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    return pipe(prompt=prompt, video=sample, height=height, width=width, num_frames=num_frames,
                num_inference_steps=steps, generator=generator, output_type=output_type, **extra)


def _wan_spatial(pipe) -> int:
    return _vae_ratio(pipe, "vae_scale_factor_spatial", 8) * _patch(pipe)


def _wan_temporal(pipe) -> int:
    return _vae_ratio(pipe, "vae_scale_factor_temporal", 4)


register_runner(CalibrationRunner(
    adapter="wan-icl", pipeline_classes=("WanInContextEditPipeline",),
    inputs="a source video (the edit's context); Wan 2.2's two experts are both calibrated", media="video", call=_wan_call,
    spatial_multiple=_wan_spatial, temporal_factor=_wan_temporal,
))

# LIVEditor takes the same call as the Wan in-context pipeline (source video in, same size out)
register_runner(CalibrationRunner(
    adapter="liveditor", pipeline_classes=("LIVEditorPipeline",),
    inputs="a source video (its latents enter beside the noisy target)", media="video", call=_wan_call,
    spatial_multiple=_wan_spatial, temporal_factor=_wan_temporal,
))


# ------------------------------------------------------------------------------------ ltx
def _ltx_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    t = _vae_ratio(pipe, "vae_temporal_compression_ratio", 8)
    # the sample is a keyframe video conditioning the clip from latent frame 1 on: its tokens are prepended
    cond = LTXVideoCondition(video=[_pil(f) for f in sample[: max(1, num_frames - t)]], frame_index=t)
    return pipe(conditions=[cond], prompt=prompt, negative_prompt="", height=height, width=width, num_frames=num_frames,
                num_inference_steps=steps, generator=generator, output_type=output_type, **extra)


register_runner(CalibrationRunner(
    adapter="ltx-condition", pipeline_classes=("LTXConditionPipeline",),
    inputs="a conditioning video (keyframes placed from the second latent frame on)", media="video", call=_ltx_call,
    spatial_multiple=lambda pipe: _vae_ratio(pipe, "vae_spatial_compression_ratio", 32),
    temporal_factor=lambda pipe: _vae_ratio(pipe, "vae_temporal_compression_ratio", 8),
))


# ------------------------------------------------------------------------------------ ltx-2
def _ltx2_text(pipe, prompt):
    if _has_text_encoder(pipe):
        return {"prompt": prompt, "negative_prompt": ""}
    cfg = pipe.connectors.config
    (pe,) = _embeddings(prompt, (cfg.caption_channels * cfg.text_proj_in_factor, True))
    mask = torch_ones_like_tokens(pe)
    return dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=pe.clone(), negative_prompt_attention_mask=mask)


def torch_ones_like_tokens(embeds):
    import torch

    return torch.ones(embeds.shape[:2], dtype=torch.long)


def _ltx2_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    kw = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=steps, generator=generator,
              output_type=output_type, **_ltx2_text(pipe, prompt))
    kw.update(extra)
    if any(c.__name__ == "LTX2InContextPipeline" for c in type(pipe).__mro__):
        from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

        return pipe(reference_conditions=[LTX2ReferenceCondition(frames=sample)], **kw)
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    t = _vae_ratio(pipe, "vae_temporal_compression_ratio", 8)
    return pipe(conditions=[LTX2VideoCondition(frames=sample[:1], index=t, strength=1.0)], **kw)


register_runner(CalibrationRunner(
    adapter="ltx2-in-context", pipeline_classes=("LTX2InContextPipeline", "LTX2ConditionPipeline"),
    inputs="a reference video (IC-LoRA), or for LTX2ConditionPipeline a video whose first frame is a keyframe",
    media="video", call=_ltx2_call,
    spatial_multiple=lambda pipe: _vae_ratio(pipe, "vae_spatial_compression_ratio", 32),
    temporal_factor=lambda pipe: _vae_ratio(pipe, "vae_temporal_compression_ratio", 8),
))


# ------------------------------------------------------------------------------------ framepack
def _framepack_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    kw = {}
    if _has_text_encoder(pipe):
        kw["prompt"] = prompt
    else:
        tr = pipe.transformer.config
        pe, pooled = _embeddings(prompt, (tr.text_embed_dim, True), (tr.pooled_projection_dim, False))
        kw.update(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=torch_ones_like_tokens(pe))
    kw.setdefault("latent_window_size", 3)
    kw.update(extra)
    return pipe(image=_pil(sample[0]), height=height, width=width, num_frames=max(num_frames, 5),
                num_inference_steps=steps, generator=generator, output_type=output_type, **kw)


register_runner(CalibrationRunner(
    adapter="framepack", pipeline_classes=("HunyuanVideoFramepackPipeline",),
    inputs="a conditioning image (the first frame of a video); the history latents are the context", media="image",
    call=_framepack_call,
    spatial_multiple=lambda pipe: _vae_ratio(pipe, "vae_scale_factor_spatial", 8) * _patch(pipe),
))


# ------------------------------------------------------------------------------------ flux
def _inpaint_mask(pipe, image) -> Dict[str, Any]:
    """Inpainting variants edit the whole frame during calibration (a white mask)."""
    if "Inpaint" not in type(pipe).__name__:
        return {}
    from PIL import Image

    return {"mask_image": Image.new("L", image.size, 255)}


def _flux_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    kw = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["prompt"] = prompt
    else:
        tr = pipe.transformer.config
        pe, pooled = _embeddings(prompt, (tr.joint_attention_dim, True), (tr.pooled_projection_dim, False))
        kw.update(prompt_embeds=pe, pooled_prompt_embeds=pooled)
    kw.update(extra)
    image = _pil(sample[0])
    kw.update(_inpaint_mask(pipe, image))
    return pipe(image=image, height=height, width=width, max_area=height * width, _auto_resize=False,
                num_inference_steps=steps, generator=generator, output_type=output_type, **kw)


register_runner(CalibrationRunner(
    adapter="flux-kontext", pipeline_classes=("FluxKontextPipeline", "FluxKontextInpaintPipeline"),
    inputs="a context image (the first frame of a video); the output has its size", media="image", call=_flux_call,
    spatial_multiple=lambda pipe: _vae_ratio(pipe, "vae_scale_factor", 8) * 2,
))


# ------------------------------------------------------------------------------------ qwen-image
def _qwen_call(pipe, sample, prompt, *, height, width, num_frames, steps, generator, output_type="latent", **extra):
    kw = {}
    if _has_text_encoder(pipe):
        kw["prompt"] = prompt
    else:
        (pe,) = _embeddings(prompt, (pipe.transformer.config.joint_attention_dim, True))
        kw.update(prompt_embeds=pe, prompt_embeds_mask=torch_ones_like_tokens(pe))
    kw.update(extra)
    image = _pil(sample[0])
    kw.update(_inpaint_mask(pipe, image))
    if any(c.__name__ == "QwenImageEditPlusPipeline" for c in type(pipe).__mro__):
        image = [image]
    return pipe(image=image, height=height, width=width, num_inference_steps=steps, generator=generator,
                output_type=output_type, **kw)


register_runner(CalibrationRunner(
    adapter="qwenimage-edit",
    pipeline_classes=("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"),
    inputs="a condition image (the first frame of a video)", media="image", call=_qwen_call,
    spatial_multiple=lambda pipe: _vae_ratio(pipe, "vae_scale_factor", 8) * 2,
))
