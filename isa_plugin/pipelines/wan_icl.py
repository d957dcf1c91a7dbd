"""``WanInContextEditPipeline``: Wan video editing with the source video in context along the frame axis.

In-context editing models built on Wan (ICVE, EditVerse-style fine-tunes; not LIVEditor: see ``LIVEditorPipeline``)
denoise the target video's latents concatenated, along the latent frame axis, with the clean latents of
the source video, and read the prediction of the target frames only. This pipeline is :class:`WanPipeline`
plus exactly that:

1. the source video is VAE-encoded (distribution mode) and normalised with the VAE's latent mean/std;
2. for every transformer call of the denoising loop, its latents are appended after (``context_position=
   "after"``, default) or before the noisy latents along frames, repeated over the batch, with the same
   timestep as the target (for per-token timesteps, ``expand_timesteps`` models, the context tokens get 0);
3. the prediction of the context frames is dropped, so the scheduler, CFG and decoding see only the
   target.

Steps 2-3 are a forward pre-hook and a forward hook on the transformer(s), registered for the duration of
the call only. The pre-hook also adds ``{"isa_context_frames": n, "isa_context_position": ...}`` to the
call's ``attention_kwargs`` (the transformer ignores them), and while a call runs
``pipe.context_latent_frames`` / ``pipe.context_position`` say the same; :func:`isa_plugin.apply_isa`
reads them to lay out ISA's target and context spans, whether applied to the pipeline or to
``pipe.transformer``.

Example:
    >>> pipe = WanInContextEditPipeline.from_pretrained("path/to/icl-wan", torch_dtype=torch.bfloat16)
    >>> isa_plugin.apply_isa(pipe, isa_plugin.ISAConfig())
    >>> frames = pipe(prompt="make it winter", video=source_frames, height=480, width=832).frames[0]
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from diffusers import WanPipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .wan_attention import CONTEXT_FRAMES_KEY, CONTEXT_POSITION_KEY

__all__ = ["WanInContextEditPipeline"]


class WanInContextEditPipeline(WanPipeline):
    """:class:`diffusers.WanPipeline` with the source video's latents in context along the frame axis.

    Components and loading are those of ``WanPipeline`` (``from_pretrained`` / ``save_pretrained`` work
    on a local folder saved by this class). See the module docstring for the method.
    """

    context_latent_frames: Optional[int] = None
    context_position: str = "after"

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_video(self, video: Any, height: int, width: int, generator=None) -> torch.Tensor:
        """VAE latents of ``video`` (any input ``VideoProcessor.preprocess_video`` takes), normalised.

        Returns:
            [B, z_dim, (F - 1) / 4 + 1, height / 8, width / 8] in float32.

        Raises:
            ValueError: the frame count is not 1 + a multiple of the VAE's temporal factor.
        """
        pixels = self.video_processor.preprocess_video(video, height=height, width=width)
        f = pixels.shape[2]
        if (f - 1) % self.vae_scale_factor_temporal != 0:
            raise ValueError(
                f"the source video has {f} frames; Wan's VAE needs 1 + a multiple of {self.vae_scale_factor_temporal} "
                f"(e.g. {((f - 1) // self.vae_scale_factor_temporal) * self.vae_scale_factor_temporal + 1})"
            )
        device = self._execution_device
        pixels = pixels.to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
        return (latents.float() - mean) / std

    # ------------------------------------------------------------------ hooks
    def _context_hooks(self, context: torch.Tensor, position: str) -> List[Any]:
        n = context.shape[2]

        def add_context(module, args, kwargs):
            if args:  # the pipeline passes keywords; be robust to positional hidden_states / timestep
                names = ("hidden_states", "timestep", "encoder_hidden_states")
                kwargs = {**dict(zip(names, args)), **kwargs}
                args = ()
            x = kwargs["hidden_states"]
            ctx = context.to(device=x.device, dtype=x.dtype)
            if ctx.shape[0] != x.shape[0]:
                if x.shape[0] % ctx.shape[0]:
                    raise ValueError(f"{ctx.shape[0]} source videos for a batch of {x.shape[0]}")
                ctx = ctx.repeat_interleave(x.shape[0] // ctx.shape[0], dim=0)
            if ctx.shape[3:] != x.shape[3:] or ctx.shape[1] != x.shape[1]:
                raise ValueError(f"source latents {tuple(ctx.shape)} do not match the noisy latents {tuple(x.shape)}")
            kwargs["hidden_states"] = torch.cat([x, ctx] if position == "after" else [ctx, x], dim=2)
            ts = kwargs.get("timestep")
            if isinstance(ts, torch.Tensor) and ts.ndim == 2:  # per-token timesteps: context is clean
                p_t, p_h, p_w = module.config.patch_size
                extra = torch.zeros(ts.shape[0], (n // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w), dtype=ts.dtype, device=ts.device)
                kwargs["timestep"] = torch.cat([ts, extra] if position == "after" else [extra, ts], dim=1)
            # tell the transformer call where the context is (read by isa_plugin's Wan adapter; Wan ignores it)
            kwargs["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), CONTEXT_FRAMES_KEY: n, CONTEXT_POSITION_KEY: position}
            return args, kwargs

        def drop_context(module, args, kwargs, output):
            sample = output[0] if isinstance(output, tuple) else output.sample
            sample = sample[:, :, : sample.shape[2] - n] if position == "after" else sample[:, :, n:]
            if isinstance(output, tuple):
                return (sample, *output[1:])
            return Transformer2DModelOutput(sample=sample)

        handles = []
        for model in (self.transformer, self.transformer_2):
            if model is not None:
                handles.append(model.register_forward_pre_hook(add_context, with_kwargs=True, prepend=True))
                handles.append(model.register_forward_hook(drop_context, with_kwargs=True, prepend=True))
        return handles

    # ------------------------------------------------------------------ call
    def __call__(self, prompt=None, negative_prompt=None, *, video: Any = None, context_position: str = "after", height: int = 480, width: int = 832, num_frames: Optional[int] = None, **kwargs):
        """Edit ``video`` following ``prompt``; other arguments as :meth:`diffusers.WanPipeline.__call__`.

        Args:
            video: the source video (list of PIL images, [F, H, W, C] array, [F, C, H, W] tensor, or a batch
                of those); resized to ``height`` x ``width``; 1 + 4k frames.
            context_position: ``"after"`` (default) or ``"before"`` the target frames.
            num_frames: frames to generate; default the source's frame count.

        Returns:
            ``WanPipelineOutput`` (or a tuple) with the target frames only.

        Raises:
            ValueError: no ``video``, an unknown ``context_position``, or a frame count the VAE cannot take.
        """
        if video is None:
            raise ValueError("WanInContextEditPipeline needs the source video: pass video=...")
        if context_position not in ("after", "before"):
            raise ValueError(f"context_position={context_position!r} is not supported; supported: 'after', 'before'")
        context = self.encode_video(video, height, width)
        if num_frames is None:
            num_frames = (context.shape[2] - 1) * self.vae_scale_factor_temporal + 1
        handles = self._context_hooks(context, context_position)
        self.context_latent_frames = int(context.shape[2])
        self.context_position = context_position
        try:
            return super().__call__(prompt, negative_prompt, height=height, width=width, num_frames=num_frames, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self.context_latent_frames = None
            self.context_position = "after"
