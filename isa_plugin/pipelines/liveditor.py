"""``LIVEditorTransformer3DModel``: the ISA paper's LIVEditor-14B editing transformer in diffusers.

LIVEditor is a Wan 14B text-to-video transformer fine-tuned for in-context video editing. Compared with
:class:`diffusers.WanTransformer3DModel` it has:

1. a second patch embedding, ``source_patch_embedding`` (same shape as ``patch_embedding``), through
   which the clean source latents enter;
2. one token sequence ``[target; source]`` (each flattened in frame, height, width order); the output
   head (final norm, projection, unpatchify) sees the target tokens only;
3. rotary positions that restart at 0 for the source: the source tokens get the 3D RoPE of their own grid,
   the same positions as the target tokens when the two have one size (diffusers' Wan RoPE: angles in
   float64, cos/sin tables in float32, as for the stock model);
4. one timestep modulation for every token (the clean source gets the noisy timestep's shift/scale/gate);
5. in every self-attention layer, a learned per-token gate on a coarse attention residual:
   ``gate = (sigmoid(alpha_1(x)) - 0.5) * 0.5`` from the layer's input x (normed and modulated hidden
   states), one scalar per token shared by all heads and channels, and the per-head attention output
   (before ``to_out``) becomes ``attention(q, k, v) + gate * coarse(q, k, v)`` with ``coarse`` =
   :func:`isa_plugin.kernels.coarse.coarse_attention` over whole-sequence 64-token blocks, on the q, k, v
   the attention sees (after the q/k RMSNorm and RoPE).

Without :func:`isa_plugin.apply_isa` the self-attention layers run :class:`LIVEditorAttnProcessor`: dense
attention plus the gated residual, which is the model's dense output (:class:`~isa_plugin.pipelines.LIVEditorPipeline`
runs ISA by default). ``precision="authors"`` (default) computes the time embedding, the residual stream and the
head in float32 whatever the weights' dtype, as the released model does; ``"native"`` keeps diffusers' Wan
rounding (:mod:`isa_plugin.pipelines.liveditor_precision`). The checkpoint the authors
publish is read by :meth:`LIVEditorTransformer3DModel.from_liveditor_checkpoint` (key names and wrappers:
:mod:`isa_plugin.pipelines.liveditor_weights`); :mod:`isa_plugin.pipelines.liveditor_convert` turns it into a
pipeline folder. The gate and the q/k/v of the self-attention are :mod:`isa_plugin.pipelines.wan_attention`'s,
shared with the ISA adapter of this model.

Example:
    >>> model = LIVEditorTransformer3DModel.from_liveditor_checkpoint("liveditor_ckpt.bin", torch_dtype=torch.bfloat16)
    >>> pred = model(noisy_latents, t, text_embeds, source_latents).sample   # [B, 16, F, H/8, W/8]
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401  (ModelMixin: see below)
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from ..kernels.coarse import COARSE_BLOCK_SIZE, gated_coarse_residual
from .liveditor_precision import LIVEditorTransformerBlock, authors_condition, check_precision, fp32_head
from .liveditor_weights import load_liveditor_transformer
from .wan_attention import liveditor_gate, wan_self_attention_qkv

# DiffusionPipeline.from_pretrained finds a component's loading method by looking up its base classes
# (``ModelMixin``) by name in the component's module, so this module must expose ModelMixin.

__all__ = ["LIVEditorTransformer3DModel", "LIVEditorAttnProcessor"]


class LIVEditorAttnProcessor:
    """LIVEditor's own self-attention processor: dense attention + the gated coarse residual.

    Same signature as diffusers' ``WanAttnProcessor``; honours ``set_attention_backend`` for the dense
    part (``dispatch_attention_fn``). The residual is :func:`~isa_plugin.kernels.coarse.gated_coarse_residual`
    with the gate of :func:`~isa_plugin.pipelines.wan_attention.liveditor_gate`.

    Args:
        block_size: coarse-residual block size (the model's ``coarse_block_size``, 64).

    Raises (when called):
        ValueError: a cross-attention call (``encoder_hidden_states`` given): this processor belongs on
            ``attn1`` only.
        RuntimeError: a call under context parallelism (the residual needs every token of a head; ISA's
            processors serve the model there).

    Example:
        >>> model.blocks[0].attn1.set_processor(LIVEditorAttnProcessor())
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, block_size: int = COARSE_BLOCK_SIZE):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size={block_size!r} must be a positive int (LIVEditor was trained with 64)")
        self.block_size = block_size

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("LIVEditorAttnProcessor is LIVEditor's self-attention processor; cross-attention keeps WanAttnProcessor")
        if getattr(self._parallel_config, "context_parallel_config", None) is not None:
            raise RuntimeError(
                "LIVEditorAttnProcessor is not context-parallel (its coarse residual needs every token of a head); "
                "apply ISA (isa_plugin.apply_isa), whose processors run the model under Ulysses context parallelism"
            )
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        out = gated_coarse_residual(out, query, key, value, liveditor_gate(attn, hidden_states), block_size=self.block_size, inplace=True)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class LIVEditorTransformer3DModel(WanTransformer3DModel):
    """The LIVEditor editing transformer: Wan 14B + source patch embedding + gated coarse residual.

    Config (the 14B defaults): ``patch_size``, ``num_attention_heads``, ``attention_head_dim``,
    ``in_channels``, ``out_channels``, ``text_dim``, ``freq_dim``, ``ffn_dim``, ``num_layers``,
    ``cross_attn_norm``, ``qk_norm``, ``eps``, ``rope_max_seq_len`` as :class:`WanTransformer3DModel`
    (no image branch), and ``coarse_block_size`` (64: the residual's block size the model was trained
    with). Extra modules: ``source_patch_embedding`` (Conv3d like ``patch_embedding``) and
    ``blocks.N.attn1.alpha_1`` (``Linear(dim, 1, bias=False)``). Every ``blocks.N.attn1`` runs
    :class:`LIVEditorAttnProcessor`; ``attn2`` keeps ``WanAttnProcessor``. No ``_cp_plan``: under Ulysses
    context parallelism the model runs with ISA's processors and
    ``isa_plugin.adapters.families.liveditor.liveditor_cp_plan``. See the module docstring for the method.

    Attribute ``precision`` (not part of the config): ``"authors"`` (default) or ``"native"``, the precision
    regime of calls that pass no ``precision=`` (see :mod:`~isa_plugin.pipelines.liveditor_precision`).

    Example:
        >>> model = LIVEditorTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=32,
        ...                                     text_dim=32, ffn_dim=128)
        >>> out = model(torch.randn(1, 16, 3, 8, 8), torch.tensor([500]), torch.randn(1, 8, 32),
        ...             torch.randn(1, 16, 3, 8, 8)).sample
    """

    _cp_plan = None
    ignore_for_config = ["image_dim", "added_kv_proj_dim", "pos_embed_seq_len"]
    _no_split_modules = ["LIVEditorTransformerBlock"]
    _repeated_blocks = ["LIVEditorTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: Tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: Optional[str] = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        coarse_block_size: int = COARSE_BLOCK_SIZE,
    ) -> None:
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=rope_max_seq_len, pos_embed_seq_len=None,
        )
        inner_dim = num_attention_heads * attention_head_dim
        self.source_patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        for block in self.blocks:
            # diffusers built the blocks; they keep their modules and gain the float32-residual path
            block.__class__ = LIVEditorTransformerBlock
            block.attn1.alpha_1 = nn.Linear(inner_dim, 1, bias=False)
            block.attn1.set_processor(LIVEditorAttnProcessor(coarse_block_size))
        self.precision = "authors"

    @property
    def precision(self) -> str:
        """The precision regime of calls without ``precision=``: ``"authors"`` or ``"native"``."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    # ------------------------------------------------------------------ shapes
    def token_counts(self, hidden_states: torch.Tensor, source_latents: torch.Tensor) -> Tuple[int, int]:
        """Target and source token counts of a call: (F/p_t)·(H/p_h)·(W/p_w) of each input.

        Args:
            hidden_states: [B, C, F, H, W] noisy target latents.
            source_latents: [B', C, F', H, W] clean source latents.

        Returns:
            ``(n_target, n_source)``; the self-attention sequence is ``[target; source]``.
        """
        p_t, p_h, p_w = self.config.patch_size
        counts = []
        for x in (hidden_states, source_latents):
            _, _, f, h, w = x.shape
            counts.append((f // p_t) * (h // p_h) * (w // p_w))
        return counts[0], counts[1]

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, source_latents) -> None:
        for name, x in (("hidden_states", hidden_states), ("source_latents", source_latents)):
            if not isinstance(x, torch.Tensor) or x.ndim != 5:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a [B, C, F, H, W] latent tensor, got {shape}")
            if x.shape[1] != self.config.in_channels:
                raise ValueError(f"{name} has {x.shape[1]} channels; the model takes in_channels={self.config.in_channels}")
            for size, p, axis in zip(x.shape[2:], self.config.patch_size, ("F", "H", "W")):
                if size % p:
                    raise ValueError(f"{name} {axis}={size} is not a multiple of the patch size {p} ({tuple(x.shape)})")
        if source_latents.shape[3:] != hidden_states.shape[3:]:
            raise ValueError(
                f"source_latents {tuple(source_latents.shape)} and hidden_states {tuple(hidden_states.shape)} differ in "
                "height/width; LIVEditor edits at the source's size: resize the source to the target size"
            )
        b, bs = hidden_states.shape[0], source_latents.shape[0]
        if b % bs:
            raise ValueError(f"{bs} source videos for a batch of {b}: the batch must be a multiple of the source count")
        if not isinstance(timestep, torch.Tensor) or timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, b)):
            shape = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__
            raise ValueError(
                f"timestep must be a tensor of shape [], [1] or [B={b}] (LIVEditor uses one timestep for all tokens), got {shape}"
            )
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            shape = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor) else type(encoder_hidden_states).__name__
            raise ValueError(f"encoder_hidden_states must be [B={b}, L, text_dim={self.config.text_dim}], got {shape}")

    # ------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        source_latents: torch.Tensor,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
        precision: Optional[str] = None,
    ) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        """Predict the flow of the target latents, given the clean source latents.

        Args:
            hidden_states: [B, 16, F, H, W] noisy target latents.
            timestep: [B], [1] or [] diffusion timestep (one per sample, shared by all its tokens).
            encoder_hidden_states: [B, L, text_dim] text-encoder states.
            source_latents: [B or a divisor of B, 16, F', H, W] clean source latents (VAE-normalised);
                repeated over the batch when fewer than B. F' may differ from F.
            attention_kwargs: the LoRA ``scale`` (PEFT); other keys are ignored by the model.
            return_dict: return a ``Transformer2DModelOutput`` (default) or a 1-tuple.
            precision: ``"authors"``: time embedding, residual stream and head in float32 (the released
                model's regime); ``"native"``: all in the weights' dtype (diffusers' Wan). Default: the
                model's ``precision`` attribute (``"authors"``). Identical with float32 weights.

        Returns:
            the target prediction [B, 16, F, H, W] (``.sample`` or ``[0]``): float32 under ``"authors"``, the
            weights' dtype under ``"native"``.

        Raises:
            ValueError: inputs of the wrong rank, channel count or size (see the messages); an unknown ``precision``.

        Example:
            >>> pred = model(x_t, torch.tensor([999.0]), text, source).sample
        """
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, source_latents)
        precision = self.precision if precision is None else check_precision(precision)
        authors = precision == "authors"
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        source = source_latents.to(device=hidden_states.device, dtype=hidden_states.dtype)
        if source.shape[0] != batch:
            source = source.repeat_interleave(batch // source.shape[0], dim=0)

        # RoPE: the source grid restarts at position 0 on every axis.
        cos_t, sin_t = self.rope(hidden_states)
        cos_s, sin_s = self.rope(source)
        rotary_emb = (torch.cat([cos_t, cos_s], dim=1), torch.cat([sin_t, sin_s], dim=1))

        target_tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        source_tokens = self.source_patch_embedding(source).flatten(2).transpose(1, 2)
        n_target = target_tokens.shape[1]
        tokens = torch.cat([target_tokens, source_tokens], dim=1)

        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        if authors:
            temb, timestep_proj, text = authors_condition(self.condition_embedder, timestep, encoder_hidden_states)
        else:
            temb, timestep_proj, text, _ = self.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, dim]: one modulation for all tokens

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, text, timestep_proj, rotary_emb, precision)
            else:
                tokens = block(tokens, text, timestep_proj, rotary_emb, precision=precision)

        # Head on the target tokens only.
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        target = tokens[:, :n_target]
        shift, scale = shift.to(target.device), scale.to(target.device)
        if authors:
            target = fp32_head(self.norm_out, self.proj_out, target, shift, scale)
        else:
            target = self.proj_out((self.norm_out(target.float()) * (1 + scale) + shift).type_as(target))
        target = target.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        output = target.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_liveditor_checkpoint(
        cls,
        path_or_state_dict: Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]],
        *,
        torch_dtype: Optional[torch.dtype] = None,
        prefix: Optional[str] = None,
        **config: Any,
    ) -> "LIVEditorTransformer3DModel":
        """Build the model from the authors' checkpoint (original Wan key naming).

        Args:
            path_or_state_dict: ``liveditor_ckpt.bin`` (read with ``torch.load(weights_only=True, mmap=True)``),
                a ``.safetensors`` file, or an in-memory state dict; the wrappers and key prefixes of
                :mod:`~isa_plugin.pipelines.liveditor_weights` are removed.
            torch_dtype: cast floating tensors to this dtype (default: keep the checkpoint's).
            prefix: keep only keys under this prefix (e.g. ``"model_ema."``) when the file holds several
                copies of the weights.
            **config: model config with :class:`WanTransformer3DModel`'s names (``num_attention_heads``,
                ``attention_head_dim``, ``num_layers``, ``ffn_dim``, ``text_dim``, ``freq_dim``,
                ``in_channels``, ``out_channels``, ...); default: the 14B config.

        Returns:
            the model on CPU in eval mode (tensors of a file are memory-mapped where the format allows).

        Raises:
            ValueError: an unreadable, truncated, foreign or code-carrying file; missing or unexpected keys
                (named); shapes that do not match the config; an unknown config key.
            FileNotFoundError: no such file.

        Example:
            >>> model = LIVEditorTransformer3DModel.from_liveditor_checkpoint("liveditor_ckpt.bin")
            >>> tiny = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, num_layers=2, num_attention_heads=2,
            ...     attention_head_dim=32, ffn_dim=64, text_dim=32)
        """
        return load_liveditor_transformer(cls, path_or_state_dict, torch_dtype=torch_dtype, prefix=prefix, **config)
