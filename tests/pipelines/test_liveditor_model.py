"""LIVEditor port: the authors' checkpoint naming -> diffusers model, against the model's equations.

The reference below (``restated_forward``) is written from the model description (Wan 14B + source
patch embedding, ``[target; source]`` tokens, source RoPE restarting at 0, one timestep modulation, head on
the target, gated coarse residual in every self-attention) and reads the state dict in the *authors'*
key naming, so it checks the key table, the model and the processor at once.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isa_plugin.kernels.coarse import coarse_attention, gated_coarse_residual
from isa_plugin.pipelines import LIVEditorPipeline, LIVEditorTransformer3DModel
from isa_plugin.pipelines.liveditor_convert import convert_liveditor_checkpoint
from isa_plugin.pipelines.liveditor_pipeline import liveditor_scheduler
from isa_plugin.pipelines.liveditor_weights import map_liveditor_keys

HEADS, HEAD_DIM, LAYERS, FFN, TEXT_DIM, FREQ_DIM, CH = 2, 32, 2, 128, 32, 32, 16
DIM = HEADS * HEAD_DIM
CONFIG = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS, ffn_dim=FFN,
              text_dim=TEXT_DIM, freq_dim=FREQ_DIM, in_channels=CH, out_channels=CH)


# ------------------------------------------------------------------------------------------ fixtures
def authors_state_dict(gen: torch.Generator) -> dict:
    """Random weights under the authors' (original Wan) key names, LIVEditor extras included."""
    sd = {}

    def put(name, *shape, std=None, base=0.0):
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        sd[name] = base + torch.randn(*shape, generator=gen) * (std if std is not None else fan_in ** -0.5)

    for conv in ("patch_embedding", "source_video_embedding_more_memory"):
        put(f"{conv}.weight", DIM, CH, 1, 2, 2, std=(CH * 4) ** -0.5)
        put(f"{conv}.bias", DIM, std=0.02)
    put("text_embedding.0.weight", DIM, TEXT_DIM); put("text_embedding.0.bias", DIM, std=0.02)
    put("text_embedding.2.weight", DIM, DIM); put("text_embedding.2.bias", DIM, std=0.02)
    put("time_embedding.0.weight", DIM, FREQ_DIM); put("time_embedding.0.bias", DIM, std=0.02)
    put("time_embedding.2.weight", DIM, DIM); put("time_embedding.2.bias", DIM, std=0.02)
    put("time_projection.1.weight", 6 * DIM, DIM, std=0.3 * DIM ** -0.5); put("time_projection.1.bias", 6 * DIM, std=0.02)
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                put(f"{p}{attn}.{proj}.weight", DIM, DIM); put(f"{p}{attn}.{proj}.bias", DIM, std=0.02)
            put(f"{p}{attn}.norm_q.weight", DIM, std=0.1, base=1.0)
            put(f"{p}{attn}.norm_k.weight", DIM, std=0.1, base=1.0)
            put(f"{p}{attn}.alpha_1.weight", 1, DIM, std=4 * DIM ** -0.5)  # large enough that the gate matters
            put(f"{p}{attn}.alpha_2.weight", 1, DIM)
        put(f"{p}norm3.weight", DIM, std=0.1, base=1.0); put(f"{p}norm3.bias", DIM, std=0.02)
        put(f"{p}ffn.0.weight", FFN, DIM); put(f"{p}ffn.0.bias", FFN, std=0.02)
        put(f"{p}ffn.2.weight", DIM, FFN); put(f"{p}ffn.2.bias", DIM, std=0.02)
        put(f"{p}modulation", 1, 6, DIM, std=DIM ** -0.5)
    put("head.head.weight", CH * 4, DIM); put("head.head.bias", CH * 4, std=0.02)
    put("head.modulation", 1, 2, DIM, std=DIM ** -0.5)
    return sd


@pytest.fixture
def sd(rng):
    return authors_state_dict(rng)


# ------------------------------------------------------------------------------------------ restatement
def restated_coarse(q, k, v, bs=64):
    """Block means over whole-sequence blocks (last one short), softmax over all blocks, broadcast."""
    B, N, H, D = q.shape
    bounds = [(s, min(s + bs, N)) for s in range(0, N, bs)]
    qm = torch.stack([q[:, a:b].mean(1) for a, b in bounds], 1)  # [B, nb, H, D]
    km = torch.stack([k[:, a:b].mean(1) for a, b in bounds], 1)
    vm = torch.stack([v[:, a:b].mean(1) for a, b in bounds], 1)
    p = torch.softmax(torch.einsum("bihd,bjhd->bhij", qm, km) / math.sqrt(D), -1)
    rows = torch.einsum("bhij,bjhd->bihd", p, vm)
    return torch.cat([rows[:, i : i + 1].expand(B, b - a, H, D) for i, (a, b) in enumerate(bounds)], 1)


def restated_forward(sd, x, t, text, src, zero_gate=False, eps=1e-6):
    """LIVEditor's forward from the authors' state dict, in plain torch (fp32; RoPE in complex128)."""
    lin = lambda name, h: F.linear(h, sd[name + ".weight"], sd.get(name + ".bias"))
    ln = lambda h, w=None, b=None: F.layer_norm(h, (DIM,), w, b, eps)
    rms = lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w

    def embed(name, v):
        y = F.conv3d(v, sd[name + ".weight"], sd[name + ".bias"], stride=(1, 2, 2))
        return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])

    xt, grid_t = embed("patch_embedding", x)
    xs, grid_s = embed("source_video_embedding_more_memory", src.expand(x.shape[0], -1, -1, -1, -1))
    n_t = xt.shape[1]
    h = torch.cat([xt, xs], 1)
    B, N, _ = h.shape

    # timestep: sinusoid [cos, sin] (float32 as diffusers' stock Wan embedding), MLP, 6-way projection
    half = FREQ_DIM // 2
    ang = t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)[None]
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([ang.cos(), ang.sin()], 1))))
    e0 = lin("time_projection.1", F.silu(e)).view(B, 6, DIM)
    ctx = lin("text_embedding.2", F.gelu(lin("text_embedding.0", text), approximate="tanh"))

    # 3D RoPE as complex rotations; the source grid starts again at (0, 0, 0)
    c = HEAD_DIM // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]

    def axis(n, d_complex):
        d = 2 * d_complex
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
        return torch.polar(torch.ones(n, d_complex, dtype=torch.float64), torch.outer(torch.arange(n, dtype=torch.float64), inv))

    def grid(f, hh, ww):
        a, b, d = axis(f, parts[0]), axis(hh, parts[1]), axis(ww, parts[2])
        cells = [a[:, None, None].expand(f, hh, ww, -1), b[None, :, None].expand(f, hh, ww, -1), d[None, None].expand(f, hh, ww, -1)]
        return torch.cat(cells, -1).reshape(f * hh * ww, c)

    rot = torch.cat([grid(*grid_t), grid(*grid_s)], 0)  # [N, c]

    def rope(u):  # [B, N, H, D]
        uc = torch.view_as_complex(u.double().reshape(B, N, HEADS, c, 2).contiguous())
        return torch.view_as_real(uc * rot[None, :, None]).reshape(B, N, HEADS, HEAD_DIM).float()

    def attention(q, k, v):
        p = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(HEAD_DIM), -1)
        return torch.einsum("bhnm,bmhd->bnhd", p, v)

    heads = lambda u: u.view(u.shape[0], u.shape[1], HEADS, HEAD_DIM)
    for i in range(LAYERS):
        p = f"blocks.{i}."
        shift, scale, gate, c_shift, c_scale, c_gate = (sd[p + "modulation"] + e0).unbind(1)
        xin = ln(h) * (1 + scale[:, None]) + shift[:, None]
        q = rope(heads(rms(lin(p + "self_attn.q", xin), sd[p + "self_attn.norm_q.weight"])))
        k = rope(heads(rms(lin(p + "self_attn.k", xin), sd[p + "self_attn.norm_k.weight"])))
        v = heads(lin(p + "self_attn.v", xin))
        g = (torch.sigmoid(xin @ sd[p + "self_attn.alpha_1.weight"].t()) - 0.5) * 0.5  # [B, N, 1]
        a = attention(q, k, v)
        if not zero_gate:
            a = a + g[..., None] * restated_coarse(q, k, v)
        h = h + lin(p + "self_attn.o", a.flatten(2)) * gate[:, None]
        xc = ln(h, sd[p + "norm3.weight"], sd[p + "norm3.bias"])
        q = heads(rms(lin(p + "cross_attn.q", xc), sd[p + "cross_attn.norm_q.weight"]))
        k = heads(rms(lin(p + "cross_attn.k", ctx), sd[p + "cross_attn.norm_k.weight"]))
        v = heads(lin(p + "cross_attn.v", ctx))
        h = h + lin(p + "cross_attn.o", attention(q, k, v).flatten(2))
        xf = ln(h) * (1 + c_scale[:, None]) + c_shift[:, None]
        h = h + lin(p + "ffn.2", F.gelu(lin(p + "ffn.0", xf), approximate="tanh")) * c_gate[:, None]
    shift, scale = (sd["head.modulation"] + e[:, None]).unbind(1)
    out = lin("head.head", ln(h[:, :n_t]) * (1 + scale[:, None]) + shift[:, None])
    f, hh, ww = grid_t
    out = out.view(B, f, hh, ww, 1, 2, 2, CH).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, CH, f, hh * 2, ww * 2)


def inputs(gen, batch=1, frames=3, source_frames=3, h=8, w=16):
    x = torch.randn(batch, CH, frames, h, w, generator=gen)
    src = torch.randn(batch, CH, source_frames, h, w, generator=gen)
    t = torch.tensor([731.0] * batch)
    text = torch.randn(batch, 7, TEXT_DIM, generator=gen)
    return x, t, text, src


# ------------------------------------------------------------------------------------------ coarse residual
@pytest.mark.parametrize("n", [150, 128, 40])
def test_coarse_attention_matches_restatement(rng, n):
    q, k, v = (torch.randn(2, n, 3, 32, generator=rng) for _ in range(3))
    got = coarse_attention(q, k, v, block_size=64)
    assert (got - restated_coarse(q, k, v)).abs().max() <= 1e-5
    gate = torch.rand(2, n, generator=rng) - 0.5
    out = torch.randn(2, n, 3, 32, generator=rng)
    want = out + gate[..., None, None] * restated_coarse(q, k, v)
    assert (gated_coarse_residual(out, q, k, v, gate) - want).abs().max() <= 1e-5
    assert torch.equal(gated_coarse_residual(out, q, k, v, gate), gated_coarse_residual(out, q, k, v, gate[..., None]))


def test_coarse_attention_rejects_bad_input():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        coarse_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
        coarse_attention(q, q[:, :5], q)
    with pytest.raises(ValueError, match="residual_gate has shape"):
        gated_coarse_residual(q, q, q, q, torch.zeros(1, 9))


# ------------------------------------------------------------------------------------------ model vs equations
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_checkpoint_forward_matches_equations(sd, rng, tmp_path, fmt):
    if fmt == "bin":  # wrapper + prefix + training entries the loader must skip
        payload = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "optimizer": {}, "step": 10}
        payload["state_dict"]["vae.encoder.weight"] = torch.zeros(3)
        path = tmp_path / "liveditor_ckpt.bin"
        torch.save(payload, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "liveditor.safetensors"
        save_file({f"wanx_unimodel.guidance_model.feedforward_model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(path, **CONFIG)
    for frames, source_frames in ((3, 3), (3, 2)):  # equal sizes, and a shorter source
        x, t, text, src = inputs(rng, batch=2, frames=frames, source_frames=source_frames)
        with torch.no_grad():
            got = model(x, t, text, src).sample
            want = restated_forward(sd, x, t, text, src)
            without_residual = restated_forward(sd, x, t, text, src, zero_gate=True)
        assert got.shape == x.shape
        assert (got - want).abs().max() <= 1e-5
        assert (want - without_residual).abs().max() > 1e-3  # the gated residual is exercised


def test_source_positions_restart_at_zero(sd, rng):
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **CONFIG)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(rope=args[3]))
    x, t, text, src = inputs(rng, frames=3, source_frames=2)
    with torch.no_grad():
        model(x, t, text, src)
    cos, sin = seen["rope"]
    n_t, n_s = model.token_counts(x, src)
    assert (n_t, n_s) == (3 * 4 * 8, 2 * 4 * 8) and cos.shape[1] == n_t + n_s
    assert torch.equal(cos[:, n_t:], model.rope(src)[0])  # the source's own grid, from 0
    # the source's 2 frames sit at positions 0..1 like the target's first 2 frames (not 3..4)
    assert torch.equal(cos[:, n_t:], cos[:, :n_s]) and torch.equal(sin[:, n_t:], sin[:, :n_s])
    target_only = model.rope(x)[0]
    assert torch.equal(cos[:, :n_t], target_only)


def test_save_and_reload_round_trip(sd, rng, tmp_path):
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **CONFIG)
    model.save_pretrained(tmp_path / "t")
    again = LIVEditorTransformer3DModel.from_pretrained(tmp_path / "t").eval()
    assert type(again.blocks[1].attn1.processor).__name__ == "LIVEditorAttnProcessor"
    saved = again.state_dict()
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    x, t, text, src = inputs(rng)
    with torch.no_grad():  # equal weights; CPU kernels may sum in another order for other allocations
        assert (model(x, t, text, src).sample - again(x, t, text, src).sample).abs().max() <= 1e-5


def test_forward_rejects_bad_inputs(sd, rng):
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **CONFIG)
    x, t, text, src = inputs(rng)
    with pytest.raises(ValueError, match="height/width"):
        model(x, t, text, src[..., :4])
    with pytest.raises(ValueError, match="one timestep for all tokens"):
        model(x, torch.zeros(1, 10), text, src)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :4], t, text, src)


# ------------------------------------------------------------------------------------------ checkpoint errors
def test_key_problems_are_named(sd, tmp_path):
    broken = dict(sd)
    del broken["blocks.1.self_attn.alpha_1.weight"]
    broken["blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(broken, **CONFIG)
    assert "blocks.1.self_attn.alpha_1.weight" in str(err.value) and "blocks.0.self_attn.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="checkpoint has 2 blocks"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **{**CONFIG, "num_layers": 3})
    with pytest.raises(ValueError, match="shape"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **{**CONFIG, "ffn_dim": 64})
    with pytest.raises(ValueError, match="unknown config key"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, image_dim=1280, **CONFIG)
    two_copies = {**{f"model.{k}": v for k, v in sd.items()}, **{f"model_ema.{k}": v + 1 for k, v in sd.items()}}
    with pytest.raises(ValueError, match="prefix="):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(two_copies, **CONFIG)
    ema = LIVEditorTransformer3DModel.from_liveditor_checkpoint(two_copies, prefix="model_ema.", **CONFIG)
    assert torch.equal(ema.blocks[0].attn1.alpha_1.weight, sd["blocks.0.self_attn.alpha_1.weight"] + 1)
    mapping, dropped, unknown = map_liveditor_keys(list(sd))
    assert len(dropped) == 3 * LAYERS and not unknown and len(mapping) == len(sd) - 3 * LAYERS


def test_bad_files_are_refused(sd, tmp_path):
    good = tmp_path / "good.bin"
    torch.save(sd, good)
    data = good.read_bytes()
    cases = {}
    (tmp_path / "truncated.bin").write_bytes(data[: len(data) // 2]); cases["truncated.bin"] = "truncated or corrupt"
    (tmp_path / "noise.bin").write_bytes(os.urandom(4096)); cases["noise.bin"] = "neither a PyTorch checkpoint nor a safetensors"
    (tmp_path / "notes.txt").write_text("not a checkpoint\n" * 50); cases["notes.txt"] = "neither a PyTorch checkpoint nor a safetensors"
    # a zip whose pickle is damaged
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "corrupt.bin", "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            body = zin.read(item)
            zout.writestr(item, b"\x00garbage" + body[8:] if item.filename.endswith("data.pkl") else body)
    cases["corrupt.bin"] = "not a readable PyTorch checkpoint"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "whole.safetensors"))
    st = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[: len(st) - 100]); cases["cut.safetensors"] = "safetensors"
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / name, **CONFIG)
    with pytest.raises(FileNotFoundError):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / "absent.bin", **CONFIG)
    with pytest.raises(ValueError, match="folder"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path, **CONFIG)


class _Payload:
    """Unpickling this would create a marker file: the loader must refuse before running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_carrying_and_foreign_checkpoints_are_refused(sd, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": sd, "extra": _Payload(marker)}, tmp_path / "code.bin")
    with pytest.raises(ValueError, match="could run code"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / "code.bin", **CONFIG)
    assert not marker.exists()
    from diffusers import WanTransformer3DModel

    stock = WanTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1, ffn_dim=FFN,
                                  text_dim=TEXT_DIM, freq_dim=FREQ_DIM)
    torch.save(stock.state_dict(), tmp_path / "diffusers_wan.bin")
    with pytest.raises(ValueError, match="diffusers' naming"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / "diffusers_wan.bin", **CONFIG)
    torch.save({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_out.bias": torch.zeros(4)}, tmp_path / "unet.bin")
    with pytest.raises(ValueError, match="no LIVEditor / Wan transformer weights"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / "unet.bin", **CONFIG)
    stock_original = {k: v for k, v in sd.items() if "alpha" not in k and "source_video" not in k}
    with pytest.raises(ValueError, match="source_video_embedding_more_memory.weight"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(stock_original, **CONFIG)
    torch.save([1, 2, 3], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        LIVEditorTransformer3DModel.from_liveditor_checkpoint(tmp_path / "list.bin", **CONFIG)


# ------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Wan diffusers pipeline folder (the converter's base): umT5 of width 32 (= TEXT_DIM), byte tokenizer, Wan VAE."""
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("wan_base")
    build_tiny_pipeline("wan").save_pretrained(path)
    return path


def _source_video(gen, frames=5, h=32, w=32):
    return torch.rand(frames, 3, h, w, generator=gen)  # [F, C, H, W] in [0, 1]


def test_convert_and_run_pipeline(sd, rng, tmp_path, base_folder):
    ckpt = tmp_path / "liveditor_ckpt.bin"
    torch.save({"module": sd}, ckpt)
    out = convert_liveditor_checkpoint(ckpt, base_folder, tmp_path / "liveditor", max_shard_size=200_000, progress=False, **CONFIG)
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # streamed into several shards
    with pytest.raises(ValueError, match="not empty"):
        convert_liveditor_checkpoint(ckpt, base_folder, out, **CONFIG)

    pipe = LIVEditorPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.flow_shift == 6.0
    direct = LIVEditorTransformer3DModel.from_liveditor_checkpoint(ckpt, **CONFIG)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name

    batches = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    video = _source_video(rng)
    final = {}

    def keep_latents(p, i, t, tensors):
        final["latents"] = tensors["latents"].clone()
        return {}

    run = lambda p, **kw: p("make it red", video=video, num_inference_steps=2, generator=torch.Generator().manual_seed(42),
                            max_sequence_length=32, height=32, width=32, **kw).frames
    frames = run(pipe, output_type="np", callback_on_step_end=keep_latents)
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all()
    assert batches == [2, 2]  # conditional and unconditional in one call per step

    pipe.save_pretrained(tmp_path / "saved")
    written = json.loads((out / "model_index.json").read_text())
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert written["transformer"] == saved["transformer"] and written["scheduler"] == saved["scheduler"]
    again = LIVEditorPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(run(again, output_type="latent"), final["latents"], rtol=0, atol=1e-5)


def test_pipeline_rejects_bad_calls(sd, rng, tmp_path, base_folder):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(base_folder / "vae")
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **CONFIG)
    pipe = LIVEditorPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=liveditor_scheduler(), transformer=model)
    embeds = torch.randn(1, 12, TEXT_DIM, generator=rng)
    with pytest.raises(ValueError, match="video="):
        pipe(prompt_embeds=embeds, guidance_scale=1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe(prompt_embeds=embeds, guidance_scale=1.0, video=_source_video(rng), height=40, width=32)
    # prompt_embeds without a text encoder, no guidance: runs, one sample per call
    out = pipe(prompt_embeds=embeds, guidance_scale=1.0, video=_source_video(rng), num_inference_steps=1, output_type="latent",
               recipe="plain")
    assert out.frames.shape == (1, 16, 2, 4, 4)


def test_pipeline_under_isa_and_frame_check(sd, rng, base_folder):
    from diffusers import AutoencoderKLWan

    from isa_plugin import ISAConfig, apply_isa, stats

    vae = AutoencoderKLWan.from_pretrained(base_folder / "vae")
    model = LIVEditorTransformer3DModel.from_liveditor_checkpoint(sd, **CONFIG)
    pipe = LIVEditorPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=liveditor_scheduler(), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 12, TEXT_DIM, generator=rng)
    video = _source_video(rng, frames=5, h=64, w=64)  # 2 latent frames of 4 x 4 tokens per video: 32 + 32 tokens
    apply_isa(pipe, ISAConfig(block_size=16))
    pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, video=video, num_frames=5, num_inference_steps=2, output_type="latent",
         height=64, width=64)
    assert all(s["isa_calls"] == 2 and s["fallbacks"] == 0 for s in stats(pipe).values())
    with pytest.raises(ValueError, match="source's length"):
        pipe(prompt_embeds=embeds, guidance_scale=1.0, video=video, num_frames=9, num_inference_steps=1, output_type="latent",
             height=64, width=64)


def test_convert_command(sd, tmp_path, base_folder, capsys):
    from isa_plugin.cli import main

    ckpt = tmp_path / "liveditor_ckpt.bin"
    torch.save(sd, ckpt)
    base = ["convert-liveditor", str(ckpt), "--base", str(base_folder), "--out", str(tmp_path / "out")]
    assert main(base) == 2  # the default 14B config does not fit the tiny checkpoint: one clear line
    err = capsys.readouterr().err
    assert err.startswith("isa: error:") and "does not match LIVEditorTransformer3DModel(num_layers=40" in err
    assert not (tmp_path / "out").exists()  # validated before writing
    assert main(base + ["--config", json.dumps(CONFIG)]) == 0
    assert "wrote" in capsys.readouterr().out
    pipe = LIVEditorPipeline.from_pretrained(tmp_path / "out")
    assert pipe.transformer.config.num_layers == LAYERS
