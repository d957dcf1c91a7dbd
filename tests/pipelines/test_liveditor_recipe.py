"""LIVEditor's sampling recipe: the sampler's schedule, the input geometry, the defaults and their switches,
the pipeline's latents step by step against a loop written here from the recipe (ISA at the authors'
settings included), and the ``attention=`` option."""

import math
import re

import numpy as np
import pytest
import torch

from isa_plugin import ISAConfig, ISAProcessor, Layout, apply_isa, remove_isa, stats
from isa_plugin.adapters import is_isa_applied, isa_processors, reset_stats
from isa_plugin.pipelines.liveditor_pipeline import liveditor_scheduler
from isa_plugin.pipelines.liveditor_recipe import (
    ASPECT_BUCKETS, bucket_size, liveditor_sigmas, resample_fps, resize_to_bucket, set_liveditor_timesteps, trim_frames,
    video_to_tensor,
)


# ------------------------------------------------------------------------------------------ sampler
def test_schedule_pinned_at_32_steps_shift_6():
    sched = liveditor_scheduler()
    set_liveditor_timesteps(sched, 32)
    sigmas, timesteps = sched.sigmas.tolist(), sched.timesteps.tolist()
    assert len(timesteps) == 32 and len(sigmas) == 33 and sigmas[-1] == 0.0
    assert [round(s, 5) for s in sigmas[:2]] == [0.99983, 0.99448]
    assert round(sigmas[-3], 4) == 0.2855 and round(sigmas[-2], 5) == 0.16202
    assert timesteps[-3:] == [382, 285, 162] and timesteps[0] == 999
    assert sched.timesteps.dtype == torch.int64


def test_schedule_rule():
    base = liveditor_sigmas(32)
    assert base[0] == float(np.float32(0.999)) and len(base) == 32
    np.testing.assert_allclose(np.diff(base), -base[0] / 32, rtol=1e-12)
    sched = liveditor_scheduler()
    set_liveditor_timesteps(sched, 8)
    shifted = 6.0 * base[:1] / (1 + 5.0 * base[:1])
    assert sched.timesteps[0].item() == int(shifted[0] * 1000)
    with pytest.raises(ValueError, match="positive"):
        liveditor_sigmas(0)


# ------------------------------------------------------------------------------------------ input
@pytest.mark.parametrize("hw, bucket", [((1080, 1920), (544, 960)), ((1920, 1080), (960, 544)), ((500, 510), (720, 720)),
                                         ((300, 640), (480, 960)), ((640, 300), (960, 480)), ((480, 832), (544, 960))])
def test_bucket_choice(hw, bucket):
    assert bucket_size(*hw) == bucket
    assert {(h, w) for w, h in ASPECT_BUCKETS.values()} >= {bucket}


def test_resize_covers_then_center_crops():
    # a 2.22:1 source into the 2:1 bucket: resized to height 480 (width 1066 rounded up to 1072), cropped in the middle
    frames = torch.zeros(1, 1, 90, 200)
    frames[..., 95:105] = 1.0  # a bright vertical band at the centre
    out = resize_to_bucket(frames)
    assert out.shape == (1, 1, 480, 960)  # 200/90 = 2.22 -> the 2:1 bucket
    band = out[0, 0, 240].argmax().item()
    assert abs(band - 480) < 30  # the centre stays in the centre
    out = resize_to_bucket(torch.rand(2, 3, 40, 64), size=(32, 48))
    assert out.shape == (2, 3, 32, 48)


def test_fps_resampling_and_frame_cut():
    frames = torch.arange(60.0).view(60, 1, 1, 1)
    out = resample_fps(frames, fps=30)
    assert out.shape[0] == 32 and out[:4].flatten().tolist() == [0, 1, 3, 5]  # t = i / 16 -> frame floor(i * 30 / 16)
    assert resample_fps(frames, fps=None) is frames and resample_fps(frames, fps=16) is frames
    assert resample_fps(torch.arange(4.0).view(4, 1), fps=8).flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="fps"):
        resample_fps(frames, fps=0)
    assert trim_frames(frames).shape[0] == 57 and trim_frames(frames[:5]).shape[0] == 5 and trim_frames(frames[:4]).shape[0] == 1


def test_video_scaling():
    array = np.full((2, 4, 6, 3), 255, np.uint8)
    assert torch.equal(video_to_tensor(array), torch.ones(2, 3, 4, 6))
    assert torch.equal(video_to_tensor(array.astype(np.float32) / 255), torch.ones(2, 3, 4, 6))
    assert torch.equal(video_to_tensor(torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)), torch.ones(2, 3, 4, 6))
    with pytest.raises(ValueError, match="F, H, W, C"):
        video_to_tensor(np.zeros((4, 6, 3)))


# ------------------------------------------------------------------------------------------ pipeline vs the recipe
TEXT_DIM = 32
TOL = 1e-5  # latents of the pipeline vs the loop written here (float32, the same attention on both sides)


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import AutoencoderKLWan

    from isa_plugin.pipelines import LIVEditorPipeline, LIVEditorTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    model = LIVEditorTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=32, text_dim=TEXT_DIM,
                                        freq_dim=64, ffn_dim=64).eval()
    pipe = LIVEditorPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=liveditor_scheduler(), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _twin(model):
    """The same weights in a new model: none of the pipeline's processors, hooks or counters."""
    twin = type(model).from_config(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _whole_sequence_blocks(seq_len):
    """The authors' blocking of ``[target; source]`` (equal halves here): 64-token blocks from token 0, the block
    that straddles target and source counted as target."""
    target = min(-(-(seq_len // 2) // 64) * 64, seq_len - 1)
    return Layout([("target", target), ("context", seq_len - target)])


def _authors_isa_twin(model):
    """A twin running the ISA the model was trained with, as the paper states it: fixed ratios 1/8, 1/2, 1/16,
    sharpness by the top 1/16 of target key blocks, 64-token blocks over the whole sequence."""
    twin = _twin(model)
    config = ISAConfig(alpha_s=1 / 8, alpha_f=1 / 2, alpha_ns=1 / 16, sharpness="topk_mass", topk_fraction=1 / 16, block_size=64)
    apply_isa(twin, config, layout=_whole_sequence_blocks)
    return twin


def _all_isa(counters, calls):
    """Every self-attention layer ran ISA ``calls`` times and never fell back to dense attention."""
    return bool(counters) and all(c["isa_calls"] == calls and c["fallbacks"] == 0 for c in counters.values())


def _lam(s):
    return torch.log(1 - s) - torch.log(s)


def _recipe_loop(model, noise, source, cond, uncond, guidance, steps):
    """The released sampler written from its definition: UniPC, bh2, predict x0, order 2 with the order-1 warm-up
    and last step, corrector from the second step; sigmas = shift(linspace(1 - 1/1000, 0, steps + 1)[:-1])."""
    base = np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1]
    shifted = 6.0 * base / (1 + 5.0 * base)
    timesteps = (shifted * 1000).astype(np.int64)
    sig = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    x, ms, xs, orders, trace = noise, [], [], [], []
    for i, t in enumerate(timesteps):
        t = torch.tensor([int(t)])
        c = model(x, t, cond, source, return_dict=False)[0]
        u = model(x, t, uncond, source, return_dict=False)[0]
        v = guidance * (c - u) + u
        m = x - sig[i] * v                      # x0 prediction
        if i > 0:                               # corrector UniC (order of the previous predictor)
            p, s0, st = orders[-1], sig[i - 1], sig[i]
            h = _lam(st) - _lam(s0)
            hh = -h
            phi1 = torch.expm1(hh)
            b_h = phi1
            x_ = st / s0 * xs[-1] - (1 - st) * phi1 * ms[-1]
            if p == 1:
                x = x_ - (1 - st) * b_h * 0.5 * (m - ms[-1])
            else:
                rk = (_lam(sig[i - 2]) - _lam(s0)) / h
                d1 = (ms[-2] - ms[-1]) / rk
                k1 = phi1 / hh - 1
                k2 = k1 / hh - 0.5
                rho = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([rk, torch.tensor(1.0)])]),
                                         torch.stack([k1 / b_h, 2 * k2 / b_h]))
                x = x_ - (1 - st) * b_h * (rho[0] * d1 + rho[1] * (m - ms[-1]))
        order = min(2, steps - i, i + 1)
        ms.append(m)
        xs.append(x)
        orders.append(order)
        s0, st = sig[i], sig[i + 1]             # predictor UniP
        h = _lam(st) - _lam(s0)
        phi1 = torch.expm1(-h)
        x_new = st / s0 * x - (1 - st) * phi1 * m
        if order == 2:
            rk = (_lam(sig[i - 1]) - _lam(s0)) / h
            x_new = x_new - (1 - st) * phi1 * 0.5 * (ms[-2] - m) / rk
        x = x_new
        trace.append(x)
    return trace


def _recipe_source(vae, frames_01, bucket_hw):
    """The released input path, written out: cover the bucket (bicubic, antialiased, 16-aligned), centre crop,
    [-1, 1], VAE mode, latent normalisation."""
    _, _, h, w = frames_01.shape
    th, tw = bucket_hw
    if w / h > tw / th:
        nh, nw = th, int(th * w / h)
    else:
        nw, nh = tw, int(tw * h / w)
    nh, nw = math.ceil(nh / 16) * 16, math.ceil(nw / 16) * 16
    x = torch.nn.functional.interpolate(frames_01, size=(nh, nw), mode="bicubic", antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[:, :, top:top + th, left:left + tw]
    x = (x - 0.5) / 0.5
    z = vae.encode(x.permute(1, 0, 2, 3)[None]).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    return (z - mean) / std


def _edit(pipe, video, cond, uncond, steps, **kw):
    """The pipeline's latents after every step (and its output)."""
    trace = []
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, video=video, num_inference_steps=steps, output_type="latent",
               callback_on_step_end=lambda p, i, t, d: trace.append(d["latents"].clone()) or {}, **kw)
    return trace, out.frames


def _case(hw, seed=1):
    gen = torch.Generator().manual_seed(seed)
    video = (torch.rand(3, hw[0], hw[1], 3, generator=gen) * 255).to(torch.uint8).numpy()  # 3 frames: the first is kept
    return video, torch.randn(1, 7, TEXT_DIM, generator=gen), torch.randn(1, 7, TEXT_DIM, generator=gen)


def _reference(model, pipe, video, cond, uncond, bucket, steps):
    frames = torch.from_numpy(video[:1]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        source = _recipe_source(pipe.vae, frames, bucket)
        noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(42))
        return source, _recipe_loop(model, noise, source, cond, uncond, 2.5, steps)


@pytest.mark.parametrize("hw, bucket", [((36, 64), (544, 960)), ((64, 36), (960, 544))], ids=["16:9", "portrait"])
def test_pipeline_latents_follow_the_recipe(tiny_pipe, hw, bucket):
    video, cond, uncond = _case(hw)
    steps = 3
    reset_stats(tiny_pipe)
    trace, out = _edit(tiny_pipe, video, cond, uncond, steps)  # defaults: the authors' recipe, ISA included
    # the loop below runs its own model with ISA as the paper states it: 2,040 target + 2,040 source tokens
    twin = _authors_isa_twin(tiny_pipe.transformer)
    source, ref = _reference(twin, tiny_pipe, video, cond, uncond, bucket, steps)
    assert out.shape == source.shape == (1, 16, 1, bucket[0] // 8, bucket[1] // 8)
    assert _all_isa(stats(tiny_pipe), steps)  # one batched (CFG) call per step
    assert _all_isa(stats(twin), 2 * steps)  # the loop calls the model twice per step
    assert len(trace) == steps
    for ours, theirs in zip(trace, ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)


def test_dense_option_gives_the_dense_result(tiny_pipe):
    video, cond, uncond = _case((36, 64), seed=3)
    steps = 2
    _edit(tiny_pipe, video, cond, uncond, 1)  # the pipeline's ISA is installed
    before = stats(tiny_pipe)
    trace, _ = _edit(tiny_pipe, video, cond, uncond, steps, attention="dense")
    assert stats(tiny_pipe) == before  # set aside for the call: not counted, still installed
    assert all(p.state.default_of == "LIVEditorPipeline" for p in isa_processors(tiny_pipe).values())
    _, ref = _reference(_twin(tiny_pipe.transformer), tiny_pipe, video, cond, uncond, (544, 960), steps)
    for ours, theirs in zip(trace, ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    isa, _ = _edit(tiny_pipe, video, cond, uncond, steps)
    assert (isa[-1] - trace[-1]).abs().max() > TOL  # ISA is not the dense result


SMALL = dict(height=256, width=256)  # 16 x 16 tokens per latent frame: 4 blocks of 64 for target and source each


def _small_case(seed=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, 64, 64, generator=gen), torch.randn(1, 7, TEXT_DIM, generator=gen),
            torch.randn(1, 7, TEXT_DIM, generator=gen))


def test_attention_option_and_the_pipelines_own_isa(tiny_pipe):
    video, cond, uncond = _small_case()
    run = lambda **kw: _edit(tiny_pipe, video, cond, uncond, 2, **SMALL, **kw)[1]
    if is_isa_applied(tiny_pipe):
        remove_isa(tiny_pipe)
    # plain recipe: dense unless asked; nothing is installed
    plain = run(recipe="plain", generator=torch.Generator().manual_seed(42))
    assert not is_isa_applied(tiny_pipe)
    # "isa" installs the authors' settings as the pipeline's own, kept after the call and counted
    isa_plain = run(recipe="plain", generator=torch.Generator().manual_seed(42), attention="isa")
    procs = isa_processors(tiny_pipe)
    assert procs and all(p.state.default_of == "LIVEditorPipeline" for p in procs.values())
    assert _all_isa(stats(tiny_pipe), 2) and (isa_plain - plain).abs().max() > TOL
    # plain's "auto" sets the pipeline's own ISA aside: the dense result again, counters untouched
    again = run(recipe="plain", generator=torch.Generator().manual_seed(42))
    assert torch.equal(again, plain) and _all_isa(stats(tiny_pipe), 2)
    assert all(tiny_pipe.transformer.get_submodule(n).processor is p for n, p in procs.items())
    # the authors' recipe's "auto" reuses the installed processors
    run()
    assert isa_processors(tiny_pipe) == procs and _all_isa(stats(tiny_pipe), 4)
    remove_isa(tiny_pipe)  # undoes it: the model's own processors
    assert stats(tiny_pipe) == {}
    assert all(type(b.attn1.processor).__name__ == "LIVEditorAttnProcessor" for b in tiny_pipe.transformer.blocks)


def test_users_own_isa_is_kept(tiny_pipe):
    video, cond, uncond = _small_case(seed=5)
    run = lambda **kw: _edit(tiny_pipe, video, cond, uncond, 2, **SMALL, **kw)[1]
    run()  # the pipeline's own ISA ...
    mine = ISAConfig(alpha_s=0.5, block_size=32)
    apply_isa(tiny_pipe, mine)  # ... is replaced by the user's, no error
    procs = isa_processors(tiny_pipe)
    assert all(p.config == mine and p.state.default_of is None for p in procs.values())
    for kw in ({}, {"attention": "isa"}, {"recipe": "plain", "generator": torch.Generator().manual_seed(42)}):
        reset_stats(tiny_pipe)
        run(**kw)
        assert isa_processors(tiny_pipe) == procs and _all_isa(stats(tiny_pipe), 2), kw
    before = stats(tiny_pipe)
    dense = run(attention="dense")  # the user's processors are set aside for the call only
    assert stats(tiny_pipe) == before and isa_processors(tiny_pipe) == procs
    assert all(tiny_pipe.transformer.get_submodule(n).processor is p for n, p in procs.items())
    remove_isa(tiny_pipe)
    assert torch.equal(run(attention="dense"), dense) and not is_isa_applied(tiny_pipe)
    # ISA installed through diffusers' set_attn_processor is the user's too
    tiny_pipe.transformer.set_attn_processor(ISAProcessor(mine))
    run()
    assert all(p.config == mine and p.state.default_of is None for p in isa_processors(tiny_pipe).values())
    remove_isa(tiny_pipe)


@pytest.mark.parametrize("kw, needle", [({"attention": "sparse"}, "attention='sparse' is not supported; supported: 'auto', 'isa', 'dense'"),
                                        ({"attention": None}, "attention=None is not supported"),
                                        ({"precision": "fp32"}, "precision='fp32' is not supported; supported: 'authors', 'native'")])
def test_bad_option_values_are_refused(tiny_pipe, kw, needle):
    video, cond, uncond = _small_case()
    with pytest.raises(ValueError, match=re.escape(needle)):
        _edit(tiny_pipe, video, cond, uncond, 1, **SMALL, **kw)


def test_recipe_switches(tiny_pipe):
    gen = torch.Generator().manual_seed(2)
    video = torch.rand(5, 3, 32, 32, generator=gen)
    cond, uncond = torch.randn(1, 7, TEXT_DIM, generator=gen), torch.randn(1, 7, TEXT_DIM, generator=gen)
    batches, timesteps = [], []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]) or timesteps.append(int(kw["timestep"][0])), with_kwargs=True)
    try:
        run = lambda **kw: tiny_pipe(**{"prompt_embeds": cond, "negative_prompt_embeds": uncond, "video": video,
                                        "num_inference_steps": 2, "output_type": "latent", "height": 32, "width": 32, **kw}).frames
        authors = run(guidance_scale=0.5)  # guidance below 1 still guides in the recipe
        assert batches == [2, 2] and timesteps == [999, 856]
        batches.clear(), timesteps.clear()
        plain = run(guidance_scale=0.5, recipe="plain", generator=torch.Generator().manual_seed(42))
        assert batches == [1, 1] and timesteps == [999, 857]  # no guidance below 1; diffusers' own schedule
        assert not torch.allclose(authors, plain)
        # the recipe's default seed is 42; a given generator replaces it
        torch.testing.assert_close(run(generator=torch.Generator().manual_seed(42)), run(), rtol=0, atol=0)
        assert not torch.equal(run(generator=torch.Generator().manual_seed(7)), run())
        # explicit size: covered and cropped to it; plain: taken as given, 1 + 4k frames or an error
        assert run().shape == (1, 16, 2, 4, 4)
        with pytest.raises(ValueError, match="1 \\+ a multiple"):
            run(recipe="plain", video=video[:4])
        assert run(video=video[:4]).shape == (1, 16, 1, 4, 4)  # the recipe keeps the first frame
        assert run(video=video.repeat(2, 1, 1, 1)[:10], fps=32).shape == (1, 16, 2, 4, 4)  # 10 frames at 32 fps -> 5
        with pytest.raises(ValueError, match="recipe"):
            run(recipe="mine")
    finally:
        hook.remove()


def test_recipe_needs_flow_sigmas(tiny_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = type(tiny_pipe)(**{**tiny_pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    with pytest.raises(ValueError, match="recipe='plain'"):
        pipe(prompt_embeds=torch.zeros(1, 7, TEXT_DIM), video=torch.rand(1, 3, 32, 32), guidance_scale=1.0,
             num_inference_steps=1, output_type="latent", height=32, width=32)


def test_default_negative_prompt_is_the_released_one():
    from isa_plugin.pipelines.liveditor_pipeline import DEFAULT_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT

    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽, 过曝，") and "稳定s的背景" in DEFAULT_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT != WAN_NEGATIVE_PROMPT
