"""LIVEditor's precision regime: which parts of the model and the VAE compute in float32 with half-precision weights.

The released model runs with bf16 weights under a bf16 autocast, and opens float32 autocast regions around
the parts that carry the signal from block to block (the authors' ``wanx/model.py`` and ``inference.py``):

- the time embedding: the sinusoid (float64 there, diffusers' float32 here; the two differ by at most 3.1e-5)
  through the time MLP and the 6-way projection in float32 (bf16 weights upcast, as a float32 autocast does);
- the modulation: ``modulation + e`` in float32 (diffusers' Wan block does this already);
- the residual stream: kept in float32 between and inside the blocks. Each block's self-attention,
  cross-attention and feed-forward take their input in the compute dtype (what the bf16 autocast hands a
  bf16 linear) and their output is added to the float32 residual (``x + y * gate`` in float32);
- the output head: final norm, modulation and projection in float32 (weights upcast); the prediction is float32;
- the VAE: encode and decode in float32 although its weights are bf16 (``autocast(dtype=float32)``).

diffusers' Wan computes all of this in the model's dtype instead (the residual is rounded to bf16 after every
sub-layer, the time projection and the head run in bf16). ``precision="authors"`` follows the released model;
``"native"`` keeps diffusers' rounding. With float32 weights the two are bit-identical.

Pieces: :data:`PRECISIONS` and :func:`check_precision` (the option's values), :func:`fp32_linear`,
:class:`LIVEditorTransformerBlock` (the block with both paths), :func:`authors_condition` (the time and text
embedding), :func:`fp32_head` and :func:`computing_in_fp32` (the VAE).

Example:
    >>> model(x_t, t, text, source, precision="authors").sample.dtype     # torch.float32 with bf16 weights
    >>> with computing_in_fp32(pipe.vae):
    ...     latents = pipe.vae.encode(pixels.float()).latent_dist.mode()
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from ..validation import validate_choice

__all__ = ["PRECISIONS", "check_precision", "fp32_linear", "LIVEditorTransformerBlock", "authors_condition", "fp32_head",
           "computing_in_fp32"]

#: ``precision=`` values: the released model's float32 regions, or the model's own dtype throughout (diffusers)
PRECISIONS = ("authors", "native")


def check_precision(value) -> str:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: any other value, naming it and the allowed ones.
    """
    return validate_choice("precision", value, PRECISIONS)


def fp32_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 with the layer's weights upcast (what a float32 autocast does to a bf16 linear).

    A layer that is not a plain ``nn.Linear`` (e.g. wrapped by a LoRA adapter) runs as it is on ``x`` in its
    weight dtype, and its output is upcast.

    Returns:
        float32 tensor; with float32 weights exactly ``linear(x)``.
    """
    if type(linear) is nn.Linear:
        bias = None if linear.bias is None else linear.bias.float()
        return F.linear(x.float(), linear.weight.float(), bias)
    return linear(x.to(linear.weight.dtype)).float()


class LIVEditorTransformerBlock(WanTransformerBlock):
    """diffusers' Wan block with a second path that keeps the residual stream in float32 (``precision="authors"``).

    ``precision="native"`` runs :class:`~diffusers.models.transformers.transformer_wan.WanTransformerBlock`'s own
    forward. ``"authors"``: the residual enters as it comes (the bf16 token embeddings at block 0, float32 after
    it) and leaves in float32; every sub-layer gets its input in the compute dtype, that of
    ``encoder_hidden_states`` (the text states, which the model computes in its dtype). The model's blocks are
    of this class (same modules and weights as diffusers' block; only ``forward`` differs).
    """

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Tuple[torch.Tensor, torch.Tensor], precision: str = "native") -> torch.Tensor:
        if precision == "native":
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        x, dtype = hidden_states, encoder_hidden_states.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        # self-attention; the norm's output takes the residual's dtype first (bf16 at block 0), as the authors' norm does
        h = self.norm1(x.float()).type_as(x).float() * (1 + scale) + shift
        x = x.float() + self.attn1(h.to(dtype), None, None, rotary_emb) * gate
        # cross-attention
        h = self.norm2(x.float())
        x = x + self.attn2(h.to(dtype), encoder_hidden_states, None, None)
        # feed-forward
        h = self.norm3(x.float()) * (1 + c_scale) + c_shift
        return x.float() + self.ffn(h.to(dtype)).float() * c_gate


def authors_condition(embedder, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """The time and text embedding of diffusers' ``WanTimeTextImageEmbedding`` with the time part in float32.

    Args:
        embedder: the model's ``condition_embedder`` (no image branch).
        timestep: [B] timesteps.
        encoder_hidden_states: [B, L, text_dim] text-encoder states.

    Returns:
        ``(temb [B, dim] float32, timestep_proj [B, 6 * dim] float32, text [B, L, dim] in the model's dtype)``;
        with float32 weights exactly the embedder's own ``temb``, ``timestep_proj`` and text states.
    """
    time = embedder.time_embedder
    assert time.cond_proj is None and time.post_act is None, "Wan's time embedder has no condition or post-activation"
    h = fp32_linear(time.linear_1, embedder.timesteps_proj(timestep))
    temb = fp32_linear(time.linear_2, time.act(h) if time.act is not None else h)
    timestep_proj = fp32_linear(embedder.time_proj, embedder.act_fn(temb))
    return temb, timestep_proj, embedder.text_embedder(encoder_hidden_states)


def fp32_head(norm_out: nn.Module, proj_out: nn.Module, tokens: torch.Tensor, shift: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """The output head in float32: ``proj_out(norm_out(tokens) * (1 + scale) + shift)``, weights upcast.

    Args:
        tokens: [B, N, dim] target tokens (float32 under the regime).
        shift, scale: [B, 1, dim] head modulation (float32 when the time embedding is).

    Returns:
        [B, N, out_channels * prod(patch)] float32.
    """
    return fp32_linear(proj_out, norm_out(tokens.float()) * (1 + scale) + shift)


@contextlib.contextmanager
def computing_in_fp32(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in float32 for the duration of the block; its half-precision weights come back unchanged.

    Every bf16/fp16 parameter and buffer is swapped for a float32 copy while the block runs (a float32 autocast
    computes the same), and the very same tensors are put back afterwards, whatever happens inside. Float32
    and non-floating tensors are left alone, so with float32 weights nothing changes.

    Example:
        >>> with computing_in_fp32(pipe.vae):
        ...     video = pipe.vae.decode(latents.float()).sample
    """
    swapped: List[Tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.dtype in (torch.bfloat16, torch.float16):
                swapped.append((tensor, tensor.data))
                tensor.data = tensor.data.float()
        yield module
    finally:
        for tensor, data in swapped:
            tensor.data = data
