"""``LIVEditorPipeline``: edit a video with LIVEditor-14B (source video in, edited video out).

Components: ``tokenizer`` + ``text_encoder`` (umT5-XXL of the base Wan model), ``vae`` (Wan 2.1 VAE),
``scheduler`` and ``transformer`` (:class:`~isa_plugin.pipelines.LIVEditorTransformer3DModel`). The folder
:func:`~isa_plugin.pipelines.liveditor_convert.convert_liveditor_checkpoint` writes loads with
``LIVEditorPipeline.from_pretrained``.

Defaults follow the released model's sampling recipe (``recipe="authors"``; the pieces are in
:mod:`~isa_plugin.pipelines.liveditor_recipe`): flow-matching UniPC (multistep, 1000 training timesteps,
shift 6.0; :func:`liveditor_scheduler`) on the released schedule, 32 steps, classifier-free guidance 2.5
(whenever the scale is not 1) with the released negative prompt (:data:`DEFAULT_NEGATIVE_PROMPT`), seed 42,
the source resampled to 16 fps, cut to 1 + 4k frames, resized to the nearest 540p aspect bucket and
center-cropped; write the edit at 16 fps. The conditional and unconditional predictions come from one
transformer call on a batch of 2 (CFG batch). ``recipe="plain"`` keeps diffusers' conventions instead.

Like the released model, the pipeline runs ISA at the authors' settings by default (``attention="auto"``;
:func:`~isa_plugin.adapters.families.liveditor.authors_isa`, installed through
:mod:`isa_plugin.adapters.defaults`; ISA the user installed is used instead) and computes in the authors'
precision regime (``precision="authors"``: float32 time embedding, residual stream, head and VAE with bf16
weights; :mod:`~isa_plugin.pipelines.liveditor_precision`).

Example:
    >>> pipe = LIVEditorPipeline.from_pretrained("liveditor-14b", torch_dtype=torch.bfloat16).to("cuda")
    >>> frames = pipe("turn the car red", video=source_frames).frames[0]     # 81 frames at 480x832
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, UniPCMultistepScheduler, WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from . import liveditor_recipe as recipe_lib
from .liveditor import LIVEditorTransformer3DModel
from .liveditor_precision import check_precision, computing_in_fp32
from .wan_icl import WanInContextEditPipeline
from ..validation import validate_choice

__all__ = ["LIVEditorPipeline", "liveditor_scheduler", "DEFAULT_NEGATIVE_PROMPT", "WAN_NEGATIVE_PROMPT", "LIVEDITOR_RECIPE", "RECIPES"]

#: ``recipe=`` values: ``"authors"`` (the released model's recipe, default) and ``"plain"`` (diffusers' conventions)
RECIPES = ("authors", "plain")

#: the negative prompt of the released configuration (``recipe="authors"``)
DEFAULT_NEGATIVE_PROMPT = recipe_lib.NEGATIVE_PROMPT

#: Wan's stock negative prompt (``sample_neg_prompt`` of Wan's shared config), ``recipe="plain"``'s default
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

#: the authors' sampling settings
LIVEDITOR_RECIPE: Dict[str, Any] = {"flow_shift": 6.0, "num_train_timesteps": 1000, "num_inference_steps": 32, "guidance_scale": 2.5, "seed": 42, "fps": 16}


def liveditor_scheduler() -> UniPCMultistepScheduler:
    """The authors' sampler: UniPC multistep on flow-matching sigmas, shift 6.0, 1000 training timesteps.

    Returns:
        a ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
        num_train_timesteps=1000, flow_shift=6.0)`` (diffusers' other UniPC defaults: order 2, bh2,
        predict x0), the scheduler Wan's diffusers exports use, with LIVEditor's shift. Its step is the
        released sampler's; the released schedule is set by
        :func:`~isa_plugin.pipelines.liveditor_recipe.set_liveditor_timesteps` (the pipeline's default).

    Example:
        >>> pipe.scheduler = liveditor_scheduler()
    """
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True,
        num_train_timesteps=LIVEDITOR_RECIPE["num_train_timesteps"], flow_shift=LIVEDITOR_RECIPE["flow_shift"],
    )


class LIVEditorPipeline(DiffusionPipeline):
    """Video editing with LIVEditor: the source video's latents enter the transformer beside the noisy target.

    Args:
        tokenizer, text_encoder: the base Wan model's (umT5); may be None when every call passes
            ``prompt_embeds`` (and ``negative_prompt_embeds`` with guidance).
        vae: ``AutoencoderKLWan``.
        scheduler: a flow-matching scheduler (default recipe: :func:`liveditor_scheduler`).
        transformer: :class:`LIVEditorTransformer3DModel`.

    Attention (the call's ``attention=``): LIVEditor-14B was fine-tuned with ISA in the loop and its authors
    always run it, so by default (``"auto"``) the pipeline runs ISA at their settings
    (:func:`~isa_plugin.adapters.families.liveditor.authors_isa`: α_s = 1/8, half the query blocks exact,
    α_ns = 1/16, the gated coarse residual, whole-sequence 64-token blocks). It installs them on the first
    such call and keeps them: :func:`isa_plugin.stats` shows the ISA calls, :func:`isa_plugin.remove_isa`
    removes them. ISA you installed yourself (``isa_plugin.apply_isa(pipe, profile)``, ``ISAProcessor``) is
    used as it is and never overwritten; ``apply_isa`` after a call replaces the pipeline's own. ``"isa"``: the
    same, also under ``recipe="plain"`` (whose ``"auto"`` is dense unless you installed ISA). ``"dense"``:
    the model's own dense attention + gate for this call; installed ISA processors are set aside for the
    call and put back, counters untouched.

    Precision (the call's ``precision=``): ``"authors"`` (default under ``recipe="authors"``) computes the
    time embedding, the residual stream, the modulation and the output head in float32 and runs the VAE
    in float32, whatever the weights' dtype, as the released model does; ``"native"`` (default under
    ``"plain"``) computes everything in the components' dtype, as diffusers' Wan does. With float32 weights
    the two are identical.

    Example:
        >>> pipe = LIVEditorPipeline.from_pretrained("liveditor-14b", torch_dtype=torch.bfloat16).to("cuda")
        >>> out = pipe("make it snow", video=frames).frames[0]                  # ISA + float32 regime, seed 42
        >>> isa_plugin.stats(pipe)["blocks.0.attn1"]["isa_calls"]               # 32 (one batched call per step)
        >>> dense = pipe("make it snow", video=frames, attention="dense").frames[0]
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents"]

    # the base pipelines' text and video encoding (same components, same conventions)
    _get_t5_prompt_embeds = WanPipeline._get_t5_prompt_embeds
    encode_prompt = WanPipeline.encode_prompt
    encode_video = WanInContextEditPipeline.encode_video

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderKLWan, scheduler, transformer: LIVEditorTransformer3DModel):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) is not None else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._current_timestep = None
        self._interrupt = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # the authors' recipe guides whenever the scale is not 1 (diffusers' convention: above 1)
        if getattr(self, "_cfg_rule", ">") == "!=":
            return self._guidance_scale != 1.0
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ helpers
    def _size_multiple(self) -> int:
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    def _resolve_size(self, video: Any, height: Optional[int], width: Optional[int]):
        if height is None or width is None:
            pixels = self.video_processor.preprocess_video(video)
            height = pixels.shape[-2] if height is None else height
            width = pixels.shape[-1] if width is None else width
        m = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of {m} (VAE factor x patch size); pass height= and "
                    f"width= (e.g. {name}={max(m, (int(value) // m) * m) if isinstance(value, (int, float)) else 480})"
                )
        return height, width

    @staticmethod
    def _split_videos(video: Any) -> List[Any]:
        """A batch of source videos as a list (one entry per video)."""
        if isinstance(video, (torch.Tensor, np.ndarray)) and video.ndim == 5:
            return list(video)
        if isinstance(video, (list, tuple)) and video and (
            isinstance(video[0], (list, tuple)) or (isinstance(video[0], (torch.Tensor, np.ndarray)) and video[0].ndim == 4)
        ):
            return list(video)
        return [video]

    def _recipe_pixels(self, video: Any, height: Optional[int], width: Optional[int], fps: Optional[float]) -> torch.Tensor:
        """The recipe's source preparation: [0, 1] frames, 16 fps, first 1 + 4k frames, bucket (or the given
        size) covered and center-cropped; returns [B, 3, F, H, W] in [-1, 1]."""
        size = None if height is None or width is None else (height, width)
        out = []
        for one in self._split_videos(video):
            frames = recipe_lib.video_to_tensor(one)
            frames = recipe_lib.resample_fps(frames, fps)
            frames = recipe_lib.trim_frames(frames, self.vae_scale_factor_temporal)
            out.append(recipe_lib.resize_to_bucket(frames, size))
        if len({tuple(x.shape) for x in out}) != 1:
            raise ValueError(f"source videos of different shapes after resizing {[tuple(x.shape) for x in out]}: pass height= and width=")
        return torch.stack(out).permute(0, 2, 1, 3, 4) * 2.0 - 1.0

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        device = self._execution_device
        latents = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
        return (latents.float() - mean) / std

    def _decode(self, latents: torch.Tensor, output_type: str):
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=latents.device, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=latents.device, dtype=torch.float32).view(1, z, 1, 1, 1)
        latents = (latents.float() * std + mean).to(self.vae.dtype)
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        *,
        video: Any = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[int] = None,
        num_inference_steps: int = LIVEDITOR_RECIPE["num_inference_steps"],
        guidance_scale: float = LIVEDITOR_RECIPE["guidance_scale"],
        num_videos_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        fps: Optional[float] = None,
        recipe: str = "authors",
        attention: str = "auto",
        precision: Optional[str] = None,
    ):
        """Edit ``video`` following ``prompt``.

        Args:
            prompt: the edit instruction(s); or pass ``prompt_embeds``.
            negative_prompt: for the unconditional branch; default :data:`DEFAULT_NEGATIVE_PROMPT` (the released
                configuration's; ``recipe="plain"``: :data:`WAN_NEGATIVE_PROMPT`); ``""`` for none.
            video: the source video (list of PIL images, [F, H, W, C] array — uint8 is scaled by 1/255, floats
                are [0, 1] —, [F, C, H, W] tensor in [0, 1], or a batch of those, one per prompt). The edited
                video has the (prepared) source's frame count. ``recipe="authors"``: resampled to 16 fps (see
                ``fps``), cut to its first 1 + 4k frames, resized to the nearest 540p aspect bucket
                (544x960, 720x720, 960x544, 480x960, 960x480; :mod:`~isa_plugin.pipelines.liveditor_recipe`)
                with its aspect kept, then center-cropped. ``recipe="plain"``: taken as it is (1 + 4k frames
                or an error; diffusers' ``VideoProcessor``).
            height, width: size of the edit (multiples of 16); default: the bucket (``"authors"``) or the
                source's size (``"plain"``). Given, the source is covered and center-cropped to it
                (``"authors"``) or resized to it (``"plain"``).
            num_frames: optional check: the edit has the source's frame count, and a different value is an error.
            num_inference_steps: denoising steps (default 32).
            guidance_scale: classifier-free guidance (default 2.5). ``"authors"``: any scale but 1 runs the
                unconditional branch; ``"plain"``: only a scale above 1.
            num_videos_per_prompt, generator, latents: as diffusers' ``WanPipeline``; ``latents`` is
                [B, 16, (F - 1)/4 + 1, height/8, width/8]. ``"authors"`` without ``generator`` samples the
                noise with seed 42 on a generator of the execution device (CUDA on a GPU; on a CPU-only
                machine a CPU generator, whose noise differs from CUDA's).
            prompt_embeds, negative_prompt_embeds: [B, L, text_dim] precomputed text states.
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            return_dict: return ``WanPipelineOutput`` (default) or a tuple.
            attention_kwargs: passed to the transformer (LoRA ``scale``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' step callback (it may replace ``latents``).
            max_sequence_length: text tokens (512 for umT5 as the model was trained).
            fps: frame rate of ``video``; with ``recipe="authors"`` a source at another rate is resampled to 16
                fps (the latest frame at or before each output time). None: taken as 16 fps already. The
                edit is meant to be written at 16 fps (``isa edit``'s default).
            recipe: ``"authors"`` (default): the released model's sampling recipe — the schedule of
                :func:`~isa_plugin.pipelines.liveditor_recipe.set_liveditor_timesteps` (needs a flow-sigma
                UniPC scheduler), the input preparation above, the released negative prompt, seed 42,
                guidance whenever the scale is not 1. ``"plain"``: diffusers' conventions — the scheduler's
                own ``set_timesteps``, the source as given, Wan's negative prompt, no default seed.
            attention: ``"auto"`` (default): ISA you installed, else ISA at the authors' settings under
                ``recipe="authors"`` and dense attention under ``"plain"``; ``"isa"``: ISA you installed, else
                the authors' settings; ``"dense"``: the model's dense attention + gate for this call (see the
                class docstring).
            precision: ``"authors"`` (float32 time embedding, residual stream, head and VAE) or ``"native"``
                (the components' dtype); default ``"authors"`` under ``recipe="authors"``, ``"native"`` under
                ``"plain"``.

        Returns:
            ``WanPipelineOutput(frames=...)``: [B, F, H, W, 3] for ``"np"``.

        Raises:
            ValueError: an unknown ``recipe``, ``attention`` or ``precision``; no ``video``; a size that is not a multiple of 16; a scheduler
                without flow sigmas under ``recipe="authors"``; a frame count the VAE cannot take;
                a source batch that does not match the prompts; bad ``latents`` shape; a bad step count.

        Example:
            >>> out = pipe("make it winter", video=frames, num_inference_steps=32).frames[0]
        """
        # the adapters are imported here, at call time, so that importing the model registers nothing
        from ..adapters.defaults import attention_for_call, check_attention, user_isa_applied
        from ..adapters.families.liveditor import authors_isa

        authors = validate_choice("recipe", recipe, RECIPES) == "authors"
        if check_attention(attention) == "auto":
            attention = "isa" if authors or user_isa_applied(self) else "dense"
        precision = ("authors" if authors else "native") if precision is None else check_precision(precision)
        in_fp32 = (lambda: computing_in_fp32(self.vae)) if precision == "authors" else contextlib.nullcontext
        if video is None:
            raise ValueError("LIVEditorPipeline edits a video: pass the source frames as video=...")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int (the recipe uses 32)")
        bad_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad_inputs)} not in {self._callback_tensor_inputs}")
        if authors:
            pixels = self._recipe_pixels(video, height, width, fps)
            height, width = self._resolve_size(None, pixels.shape[-2], pixels.shape[-1])
        else:
            height, width = self._resolve_size(video, height, width)
        self._guidance_scale = float(guidance_scale)
        self._cfg_rule = "!=" if authors else ">"
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        if self.do_classifier_free_guidance and negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = DEFAULT_NEGATIVE_PROMPT if authors else WAN_NEGATIVE_PROMPT
        if prompt is not None and isinstance(negative_prompt, str) and not isinstance(prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )
        prompt_embeds = prompt_embeds.to(dtype)
        batch = prompt_embeds.shape[0]

        with in_fp32():
            source = self._encode_pixels(pixels) if authors else self.encode_video(video, height, width)
        source = source.to(device=device, dtype=dtype)
        source_frames = (source.shape[2] - 1) * self.vae_scale_factor_temporal + 1
        if num_frames is not None and num_frames != source_frames:
            raise ValueError(
                f"num_frames={num_frames}, but LIVEditor edits at the source's length ({source_frames} frames); "
                "omit num_frames or trim the source video"
            )
        n_prompts = batch // num_videos_per_prompt
        if source.shape[0] not in (1, n_prompts):
            raise ValueError(f"{source.shape[0]} source videos for {n_prompts} prompts: pass one video, or one per prompt")
        source = source.repeat_interleave(batch // source.shape[0], dim=0)

        shape = (batch, self.transformer.config.in_channels, source.shape[2], source.shape[3], source.shape[4])
        if latents is None:
            if generator is None and authors:
                generator = torch.Generator(device=device).manual_seed(recipe_lib.SEED)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape}")
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        if self.do_classifier_free_guidance:
            text = torch.cat([negative_prompt_embeds.to(dtype), prompt_embeds])
            source_in = torch.cat([source, source])
        else:
            text, source_in = prompt_embeds, source

        if authors:
            recipe_lib.set_liveditor_timesteps(self.scheduler, num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar, attention_for_call(self, attention, authors_isa):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                x = latents.to(dtype)
                x_in = torch.cat([x, x]) if self.do_classifier_free_guidance else x
                pred = self.transformer(
                    hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=text,
                    source_latents=source_in, attention_kwargs=attention_kwargs, return_dict=False, precision=precision,
                )[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            video_out = latents
        else:
            with in_fp32():
                video_out = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video_out,)
        return WanPipelineOutput(frames=video_out)
