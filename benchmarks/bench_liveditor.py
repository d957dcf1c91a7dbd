"""Benchmark: LIVEditor-14B transformer forward with ISA + gate vs dense + gate; the gate's cost; blockings.

Shape (defaults): LIVEditor 14B (40 heads x head_dim 128 = 5120, ffn 13824), ``--layers 8`` of the 40,
random bf16 weights, 480p 81-frame edit: target and source latents of 21 x 60 x 104 each, i.e.
32,760 target + 32,760 source tokens (65,520), batch 2 (CFG), 512 text tokens.

Measured (median wall time, CUDA events, ``--reps`` runs after ``--warmup``):

1. model forward, dense + gate: the model's own processors (SDPA + gated coarse residual);
2. model forward, dense without the gate (stock ``WanAttnProcessor`` on ``attn1``): the gate's cost in the
   dense model is (1) - (2);
3. model forward, ISA + gate: ``apply_isa(model, ISAConfig())`` (the family's layout: target then source,
   per-span blocks);
4. one attention call on layer 0's q, k, v and gate: ``isa_attention`` with and without
   ``residual_gate`` (the gate's cost inside an ISA call), dense SDPA with and without the residual;
5. blocking (whole-sequence 64-blocks as the authors' ISA vs the package's per-span blocks): on layer 0's
   q, k, v, ``isa_attention(..., residual_gate=g)`` under the two layouts, each against dense + gate
   (relative L2); and the whole forward under the two layouts (relative L1 to each other and to the dense
   forward). The authors' blocking is emulated exactly by a layout whose target span is rounded up to a
   multiple of the block size (the straddling block counted as target, as a whole-sequence block index
   below ceil(n_target / 64) would be): ``LIVEditorLayout(blocking="sequence")``.

Correctness gate (no time is reported when it fails): every ISA layer ran ISA on every timed call (no
fallback), outputs are finite, and on layer 0 ISA with all ratios 1 plus the gate equals dense + gate
(bf16 tolerance).

Examples:
    python benchmarks/bench_liveditor.py                      # 14B shape, 8 layers, 480p x 81 frames
    python benchmarks/bench_liveditor.py --record BENCHMARKS.md
    python benchmarks/bench_liveditor.py --tiny               # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_wan_forward import timed  # noqa: E402
from wan_model import add_wan_shape_args, build_wan_transformer, rel_l1, rel_l2  # noqa: E402
import isa_plugin  # noqa: E402
from isa_plugin import ISAConfig, isa_attention  # noqa: E402
from isa_plugin.adapters import apply_isa, remove_isa, reset_stats, stats  # noqa: E402
from isa_plugin.attention import dense_attention  # noqa: E402
from isa_plugin.kernels.coarse import coarse_kernels_serve, gated_coarse_residual  # noqa: E402
from isa_plugin.pipelines import LIVEditorTransformer3DModel  # noqa: E402
from isa_plugin.pipelines.wan_attention import liveditor_gate  # noqa: E402
from isa_plugin.adapters.families.liveditor import liveditor_layout  # noqa: E402

TINY = dict(layers=1, heads=2, head_dim=32, ffn=64, text_dim=32, text=8, frames=3, source_frames=3, height=8,
            width=14, block_size=16, reps=1, warmup=0, device="cpu", dtype="float32")


def _versions():
    """triton and diffusers versions for the result header ("absent" when not importable)."""
    out = []
    for name in ("triton", "diffusers"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            out.append(f"{name} absent")
    return ", ".join(out)



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_wan_shape_args(ap, layers=8)
    ap.add_argument("--frames", type=int, default=21, help="target latent frames")
    ap.add_argument("--source-frames", type=int, default=21, help="source latent frames")
    ap.add_argument("--block-size", type=int, default=64, help="ISA block size")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    ap.add_argument("--record", default=None, help="append the markdown result table to this file")
    ap.add_argument("--precision", default="authors", choices=["authors", "native"],
                    help="the model's precision regime (float32 residual stream and head, or all in --dtype)")
    a = ap.parse_args()
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
    device, dtype = a.device, getattr(torch, a.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --tiny for a CPU smoke test")

    t0 = time.time()
    model = build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=a.layers, text_dim=a.text_dim,
                                  device=device, dtype=dtype, model_cls=LIVEditorTransformer3DModel)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.batch, 16, a.frames, a.height, a.width, generator=g, device=device, dtype=dtype)
    src = torch.randn(a.batch, 16, a.source_frames, a.height, a.width, generator=g, device=device, dtype=dtype)
    text = torch.randn(a.batch, a.text, a.text_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((a.batch,), 500, device=device, dtype=torch.long)
    model.precision = a.precision
    n_t, n_s = model.token_counts(x, src)
    print(f"LIVEditor transformer: {a.layers} layers, {a.heads} heads x {a.head_dim}, ffn {a.ffn}; batch {a.batch}, "
          f"{n_t} target + {n_s} source tokens, {a.text} text tokens, {a.dtype} (precision {a.precision}), {device} (built in {time.time() - t0:.0f} s)",
          flush=True)

    def fwd():
        with torch.no_grad():
            return model(x, t, text, src, return_dict=False)[0]

    rows, failures = [], []

    # 1-2. dense with and without the gate
    ms_dense_gate, ref = timed(fwd, a.reps, a.warmup, device)
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    own = [blk.attn1.processor for blk in model.blocks]
    for blk in model.blocks:
        blk.attn1.set_processor(WanAttnProcessor())
    ms_dense, _ = timed(fwd, a.reps, a.warmup, device)
    for blk, proc in zip(model.blocks, own):
        blk.attn1.set_processor(proc)
    rows += [("forward, dense + gate", ms_dense_gate), ("forward, dense without gate", ms_dense)]

    # capture layer 0's attention inputs and gate
    captured = {}

    def grab(module, args):
        captured.setdefault("gate", liveditor_gate(module, args[0]))

    hook = model.blocks[0].attn1.register_forward_pre_hook(grab)
    cfg = ISAConfig(block_size=a.block_size)
    apply_isa(model, cfg)

    def observer(name, q, k, v, layout, step):
        if name == "blocks.0.attn1" and "q" not in captured:
            captured.update(q=q, k=k, v=v, layout=layout)

    with isa_plugin.adapters.observe_attention(model, observer, dense=False):
        fwd()  # warm-up / compilation; fills `captured`
    hook.remove()
    reset_stats(model)
    ms_isa_gate, out_span = timed(fwd, a.reps, max(0, a.warmup - 1), device)
    rows.append(("forward, ISA + gate (per-span blocks)", ms_isa_gate))
    per_layer = stats(model)
    calls = a.reps + max(0, a.warmup - 1)
    bad = {n: s for n, s in per_layer.items() if s["fallbacks"] or s["isa_calls"] != calls}
    if bad:
        failures.append(f"{len(bad)} layers did not run ISA on every call: {next(iter(bad.items()))}")
    if not torch.isfinite(out_span).all():
        failures.append("ISA forward output is not finite")

    # 4. one attention call, with and without the residual
    q, k, v, gate, layout = captured["q"], captured["k"], captured["v"], captured["gate"], captured["layout"]
    block = model.config.coarse_block_size
    ms_call, _ = timed(lambda: isa_attention(q, k, v, layout, cfg), a.reps, 1, device)
    ms_call_gate, call_span = timed(lambda: isa_attention(q, k, v, layout, cfg, residual_gate=gate), a.reps, 1, device)
    ms_sdpa, _ = timed(lambda: dense_attention(q, k, v), a.reps, 1, device)
    ms_sdpa_gate, dense_gate = timed(lambda: gated_coarse_residual(dense_attention(q, k, v), q, k, v, gate, block_size=block),
                                     a.reps, 1, device)
    rows += [("layer-0 call, ISA", ms_call), ("layer-0 call, ISA + gate", ms_call_gate),
             ("layer-0 call, SDPA", ms_sdpa), ("layer-0 call, SDPA + gate", ms_sdpa_gate)]
    exact = ISAConfig(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=a.block_size)
    err_exact = rel_l2(isa_attention(q, k, v, layout, exact, residual_gate=gate), dense_gate)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if err_exact > tol:
        failures.append(f"all-ratios-1 ISA + gate vs dense + gate on layer 0: rel L2 {err_exact:.3g} > {tol}")

    # 5. blockings
    seq_layout = liveditor_layout(n_t, n_s, a.block_size, blocking="sequence")
    call_seq = isa_attention(q, k, v, seq_layout, cfg, residual_gate=gate)
    remove_isa(model)
    apply_isa(model, cfg, layout=seq_layout)
    out_seq = fwd()
    remove_isa(model)
    if not torch.isfinite(out_seq).all():
        failures.append("ISA forward output (sequence blocking) is not finite")

    if failures:
        print("CORRECTNESS GATE FAILED; no times reported:\n  " + "\n  ".join(failures), flush=True)
        raise SystemExit(1)

    gate_dense_pct = 100.0 * (ms_dense_gate - ms_dense) / ms_dense
    gate_call_pct = 100.0 * (ms_call_gate - ms_call) / ms_call
    lines = [
        f"### {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'CPU'}, torch {torch.__version__}, "
        f"{_versions()}, isa_plugin {isa_plugin.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`python benchmarks/bench_liveditor.py {' '.join(sys.argv[1:])}` — {a.layers} layers, batch {a.batch}, "
        f"{n_t} + {n_s} tokens, {a.dtype}, random weights; layout {layout} vs {seq_layout}",
        "",
        "| measurement | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.2f} |" for name, ms in rows],
        "",
        f"- ISA speed-up of the forward (both with the gate): {ms_dense_gate / ms_isa_gate:.2f}x",
        f"- gate cost: dense forward {gate_dense_pct:+.1f}%, one ISA call {gate_call_pct:+.1f}% "
        f"({ms_call_gate - ms_call:.2f} ms of {ms_call:.2f} ms)",
        f"- all-ratios-1 ISA + gate vs dense + gate (layer 0): rel L2 {err_exact:.2e}",
        f"- coarse residual route: {'Triton kernels' if coarse_kernels_serve(q, k, v, block) else 'PyTorch'}",
        f"- blocking, layer-0 call: per-span vs dense+gate rel L2 {rel_l2(call_span, dense_gate):.4f}; "
        f"sequence vs dense+gate {rel_l2(call_seq, dense_gate):.4f}; per-span vs sequence {rel_l2(call_span, call_seq):.4f}",
        f"- blocking, forward: per-span vs dense rel L1 {rel_l1(out_span, ref):.4f}; sequence vs dense {rel_l1(out_seq, ref):.4f}; "
        f"per-span vs sequence {rel_l1(out_span, out_seq):.4f}",
    ]
    text_out = "\n".join(lines)
    print(text_out, flush=True)
    if a.record:
        with open(a.record, "a", encoding="utf-8") as f:
            f.write("\n" + text_out + "\n")


if __name__ == "__main__":
    main()
