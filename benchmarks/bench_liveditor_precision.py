"""Check: LIVEditor's precision regime in bf16 against a float32 run of the same weights, with the native bf16 path beside it.

``LIVEditorTransformer3DModel`` at the 14B shape (40 heads x 128 = 5120, ffn 13,824, text 4096), ``--layers``
of the 40 (default 2), random weights created in bf16 (the ``_keep_in_fp32_modules`` in float32, as
``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them). Inputs: a 480p 81-frame edit by default, target
and source latents of 21 x 60 x 104 each (32,760 + 32,760 tokens), batch 2 (the CFG batch), 512 text tokens.
Attention is the model's own (dense SDPA + the trained gate's coarse residual) on every run, so the runs differ
only in where they round.

Runs, at each of ``--timesteps``:

- ``fp32``: the same weights upcast to float32, computed in float32 (TF32 off): the reference;
- ``authors``: bf16 weights, ``precision="authors"`` (float32 time embedding, residual stream and head);
- ``native``: bf16 weights, ``precision="native"`` (diffusers' Wan: everything in bf16).

Reported per run and timestep: relative L2 and L1 error of the prediction against ``fp32``, its max abs error,
the relative L2 error of the residual stream after the last block, and the forward's median time (the
reference's: one run). A gate
refuses to report when an output is not finite, when the authors' residual is not float32 between blocks, or
when the float32 model does not give bit-identical outputs under the two regimes.

Examples:
    python benchmarks/bench_liveditor_precision.py --json precision.json          # one GPU (estimated 2-3 min on an H200)
    python benchmarks/bench_liveditor_precision.py --layers 4 --frames 21 --height 90 --width 160   # 720p
    python benchmarks/bench_liveditor_precision.py --device cpu --tiny             # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_wan_forward import timed  # noqa: E402
from wan_model import add_wan_shape_args, build_wan_transformer, rel_l1, rel_l2  # noqa: E402
from isa_plugin.pipelines import LIVEditorTransformer3DModel  # noqa: E402

TINY = dict(layers=2, heads=2, head_dim=32, ffn=64, text_dim=32, text=8, batch=2, frames=2, height=16, width=16,
            timesteps=[999, 500], reps=1, warmup=0)
RUNS = ("authors", "native")


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    return out



class LastResidual:
    """Keeps the dtype of every block's output and the last block's output of each forward."""

    def __init__(self, model):
        self.dtypes, self.last = [], None
        last = len(model.blocks) - 1
        self.handles = [b.register_forward_hook(self._hook(i == last)) for i, b in enumerate(model.blocks)]

    def _hook(self, keep):
        def hook(module, args, out):
            self.dtypes.append(out.dtype)
            if keep:
                self.last = out.detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_wan_shape_args(ap, layers=2)
    ap.add_argument("--frames", type=int, default=21, help="latent frames of the target and of the source")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 500, 162])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: a smoke test of the script)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args()
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --tiny for a CPU smoke test")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    torch.backends.cudnn.allow_tf32 = False

    t0 = time.time()
    torch.manual_seed(a.seed)
    half = build_wan_transformer(heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, layers=a.layers, text_dim=a.text_dim,
                                 device=a.device, dtype=torch.bfloat16, model_cls=LIVEditorTransformer3DModel)
    full = copy.deepcopy(half).float()  # the same weights, computed in float32
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    shape = (a.batch, 16, a.frames, a.height, a.width)
    x = torch.randn(shape, generator=g, device=a.device)
    src = torch.randn(shape, generator=g, device=a.device)
    text = torch.randn(a.batch, a.text, a.text_dim, generator=g, device=a.device)
    n_t, n_s = half.token_counts(x, src)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"LIVEditor transformer: {a.layers} layers, {a.heads} heads x {a.head_dim}, ffn {a.ffn}; batch {a.batch}, "
          f"{n_t} target + {n_s} source tokens, {a.text} text tokens; {device_name} (built in {time.time() - t0:.0f} s)",
          flush=True)

    problems, rows = [], []
    with torch.no_grad():
        probe = torch.full((a.batch,), a.timesteps[0], device=a.device)
        same = [full(x, probe, text, src, precision=p).sample for p in RUNS]
        if not torch.equal(*same):
            problems.append("float32 weights: precision='authors' and 'native' differ (must be bit-identical)")
        del same
        for step in a.timesteps:
            t = torch.full((a.batch,), step, device=a.device)
            watch = LastResidual(full)
            ms, ref = timed(lambda: full(x, t, text, src).sample, 1, 0, a.device)  # the reference: one run
            ref_residual = watch.last
            watch.close()
            rows.append(dict(run="fp32", timestep=step, ms=ms, dtype=str(ref.dtype)))
            for run in RUNS:
                watch = LastResidual(half)
                ms, out = timed(lambda: half(x.bfloat16(), t, text.bfloat16(), src.bfloat16(), precision=run).sample,
                                a.reps, a.warmup, a.device)
                watch.close()
                if not torch.isfinite(out).all():
                    problems.append(f"{run} at t={step}: non-finite output")
                if run == "authors" and set(watch.dtypes) != {torch.float32}:
                    problems.append(f"authors at t={step}: block outputs {sorted(set(map(str, watch.dtypes)))}, not float32")
                rows.append(dict(run=run, timestep=step, ms=ms, dtype=str(out.dtype), rel_l2=rel_l2(out, ref),
                                 rel_l1=rel_l1(out, ref), max_abs=(out.float() - ref).abs().max().item(),
                                 residual_rel_l2=rel_l2(watch.last, ref_residual)))
            del ref, ref_residual

    if problems:
        print("correctness gate failed; no results reported:\n  " + "\n  ".join(problems))
        return 1
    header = f"{'run':8} {'t':>4} {'output':>14} {'rel L2':>9} {'rel L1':>9} {'max abs':>9} {'residual L2':>12} {'ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        errs = ("{:>9.2e} {:>9.2e} {:>9.2e} {:>12.2e}".format(r["rel_l2"], r["rel_l1"], r["max_abs"], r["residual_rel_l2"])
                if "rel_l2" in r else f"{'(reference)':>42}")
        print(f"{r['run']:8} {r['timestep']:>4} {r['dtype']:>14} {errs} {r['ms']:>9.1f}")
    ratios = [a_["rel_l2"] / n["rel_l2"] for a_, n in zip(*(sorted((r for r in rows if r["run"] == k), key=lambda r: r["timestep"])
                                                           for k in RUNS))]
    print(f"authors / native rel L2 error: {', '.join(f'{v:.2f}' for v in ratios)} (per timestep, ascending t)")
    if a.json:
        result = dict(date=datetime.date.today().isoformat(), device=device_name, versions=_versions(),
                      config=dict(layers=a.layers, heads=a.heads, head_dim=a.head_dim, ffn=a.ffn, text_dim=a.text_dim,
                                  text=a.text, batch=a.batch, target_tokens=n_t, source_tokens=n_s, seed=a.seed,
                                  reps=a.reps, warmup=a.warmup),
                      rows=rows)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
