"""LIVEditor's precision regime (``precision="authors"``): float32 time embedding, residual stream, head and VAE
with half-precision weights; bit-identical to the native path with float32 weights."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from isa_plugin.pipelines import LIVEditorPipeline, LIVEditorTransformer3DModel
from isa_plugin.pipelines.liveditor_pipeline import liveditor_scheduler
from isa_plugin.pipelines.liveditor_precision import computing_in_fp32

TEXT_DIM = 32


def tiny_model(seed: int = 0, layers: int = 2) -> LIVEditorTransformer3DModel:
    """A tiny model whose every weight is perturbed, so that modulation, gates and biases all matter."""
    torch.manual_seed(seed)
    model = LIVEditorTransformer3DModel(num_layers=layers, num_attention_heads=2, attention_head_dim=32, text_dim=TEXT_DIM,
                                        freq_dim=64, ffn_dim=128).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 16, 16, generator=g), torch.tensor([700, 700]), torch.randn(2, 7, TEXT_DIM, generator=g),
            torch.randn(1, 16, 2, 16, 16, generator=g))


def block_dtypes(model, run):
    """(dtypes of every block's input, dtypes of every block's output) during ``run()``."""
    seen_in, seen_out = [], []
    handles = [b.register_forward_hook(lambda m, a, out: seen_out.append(out.dtype)) for b in model.blocks]
    handles += [b.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].dtype)) for b in model.blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen_in, seen_out


def test_regime_is_bit_identical_with_fp32_weights():
    model, (x, t, text, src) = tiny_model(layers=3), inputs()
    with torch.no_grad():
        authors = model(x, t, text, src, precision="authors").sample
        native = model(x, t, text, src, precision="native").sample
        default = model(x, t, text, src).sample
    assert model.precision == "authors" and torch.equal(default, authors)
    assert authors.dtype == torch.float32 and torch.equal(authors, native)


def test_regime_keeps_the_residual_in_fp32_and_is_closer_to_fp32(caplog):
    half = tiny_model().to(torch.bfloat16)
    full = copy.deepcopy(half).float()  # the same (bf16-rounded) weights, computed in float32
    x, t, text, src = inputs()
    bf = lambda *a: [v.bfloat16() for v in a]
    out = {}
    with torch.no_grad():
        reference = full(x, t, text, src).sample
        for precision in ("authors", "native"):
            seen_in, seen_out = block_dtypes(half, lambda: out.__setitem__(precision, half(*bf(x), t, *bf(text, src), precision=precision).sample))
            if precision == "authors":  # bf16 token embeddings in, float32 from the first block on
                assert seen_in == [torch.bfloat16] + [torch.float32] * (len(half.blocks) - 1)
                assert seen_out == [torch.float32] * len(half.blocks)
            else:
                assert seen_in == seen_out == [torch.bfloat16] * len(half.blocks)
    assert out["authors"].dtype == torch.float32 and out["native"].dtype == torch.bfloat16
    error = {k: ((v.float() - reference).norm() / reference.norm()).item() for k, v in out.items()}
    assert 0 < error["authors"] < error["native"], error


def test_model_attribute_and_gradient_checkpointing():
    model, (x, t, text, src) = tiny_model(), inputs()
    model = model.to(torch.bfloat16)
    args = (x.bfloat16(), t, text.bfloat16(), src.bfloat16())
    with torch.no_grad():
        authors = model(*args).sample
        model.precision = "native"
        assert torch.equal(model(*args).sample, model(*args, precision="native").sample)
        assert not torch.equal(model(*args).sample.float(), authors)
    model.precision = "authors"
    model.enable_gradient_checkpointing()
    with torch.enable_grad():  # checkpointed blocks get the call's precision too
        assert torch.equal(model(*args).sample, authors)
    with pytest.raises(ValueError, match=re.escape("precision='fp32' is not supported; supported: 'authors', 'native'")):
        model.precision = "fp32"
    with pytest.raises(ValueError, match="precision='bf16'"), torch.no_grad():
        model(*args, precision="bf16")


def test_computing_in_fp32_puts_the_same_tensors_back():
    layer = torch.nn.Linear(8, 4).bfloat16()
    weight, storage = layer.weight, layer.weight.data_ptr()
    x = torch.randn(3, 8)
    with computing_in_fp32(layer):
        assert layer.weight.dtype == torch.float32
        out = layer(x)
    assert layer.weight is weight and weight.data_ptr() == storage and weight.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x, weight.float(), layer.bias.float()))
    with pytest.raises(RuntimeError, match="inside"), computing_in_fp32(layer):
        raise RuntimeError("inside")
    assert weight.data_ptr() == storage and weight.dtype == torch.bfloat16


def _pipe(vae):
    return LIVEditorPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=liveditor_scheduler(), transformer=tiny_model())


def test_pipeline_runs_the_vae_in_fp32_and_passes_its_precision():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval().to(torch.bfloat16)
    weights = {n: (p, p.data_ptr()) for n, p in vae.named_parameters()}
    half, full = _pipe(vae), _pipe(copy.deepcopy(vae).float())  # the same VAE weights, stored in float32
    for p in (half, full):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    video, cond = torch.rand(5, 3, 32, 32, generator=g), torch.randn(1, 7, TEXT_DIM, generator=g)
    seen = []

    def run(pipe, **kw):
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: seen.append((k["precision"], k["source_latents"].clone())), with_kwargs=True)
        try:
            return pipe(prompt_embeds=cond, video=video, guidance_scale=1.0, num_inference_steps=1, height=32, width=32,
                        output_type="pt", attention="dense", **kw).frames
        finally:
            hook.remove()

    out_half, out_full = run(half), run(full)  # recipe "authors": precision "authors"
    (p_half, src_half), (p_full, src_full) = seen
    assert p_half == p_full == "authors"
    assert torch.equal(src_half, src_full) and torch.equal(out_half, out_full)  # encode and decode in float32
    assert all(p is weights[n][0] and p.data_ptr() == weights[n][1] for n, p in vae.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    seen.clear()
    out_native = run(half, precision="native")
    (p_native, src_native), = seen
    assert p_native == "native" and not torch.equal(src_native, src_full) and not torch.equal(out_native, out_full)
    seen.clear()
    run(half, recipe="plain", generator=torch.Generator().manual_seed(42))
    assert seen[0][0] == "native"  # plain recipe: diffusers' precision unless asked
