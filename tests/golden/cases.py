"""Golden cases: fixed inputs whose outputs were recorded once and must not change bit for bit.

``python tests/golden/cases.py record`` writes ``tests/golden/data/`` (run it only when a change of
behaviour is intended, and say so in the commit). ``test_golden.py`` recomputes every case and compares.

- ``reference``: the PyTorch reference of both selection modes on fixed-seed inputs (fp32 and fp64);
- ``executors``: the GPU executors run on the CPU (Triton kernels under TRITON_INTERPRET=1, FlexAttention),
  fp16 / fp32;
- ``profiles``: the profiles ``isa calibrate`` writes for the tiny Wan and LTX-2 pipelines (fixed and
  ``--adaptive``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
#: calibrate runs: (family, extra CLI flags)
PROFILE_RUNS = {"wan_fixed": ("wan", []), "wan_adaptive": ("wan", ["--adaptive"]),
                "ltx2_fixed": ("ltx2", []), "ltx2_adaptive": ("ltx2", ["--adaptive"])}
#: profile keys that describe the run rather than its result
VOLATILE = ("seconds", "pipeline", "versions")

LAYOUTS = {
    "tc": [("target", 150), ("context", 130)],
    "ragged": [("text", 20), ("target", 100), ("context", 1), ("context", 70), ("target", 65)],
}


def _inputs(seed, spans, B=2, H=3, D=32, dtype=None):
    import torch

    from isa_plugin import Layout

    g = torch.Generator().manual_seed(seed)
    layout = Layout(spans)
    n = layout.num_tokens
    q, k, v = (torch.randn(B, n, H, D, generator=g) for _ in range(3))
    # structure: every query leans towards its own position's key (a diagonal), as in real video models
    k = k + 0.8 * q
    if dtype is not None:
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v, layout


def reference_configs():
    from isa_plugin import ISAConfig

    return {
        "fixed_default": ISAConfig(block_size=32),
        "fixed_per_head": ISAConfig(alpha_s=(0.25, 0.5, 1.0), alpha_f=0.25, alpha_ns=(0.5, 0.125, 0.25), block_size=32),
        "fixed_l2_share": ISAConfig(alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, sharpness="l2", share_plan=True, block_size=32),
        "adaptive": ISAConfig(mode="adaptive", mass=0.8, pseudo_block=8, block_size=32),
        "adaptive_ctx": ISAConfig(mode="adaptive", mass=(0.7, 0.9, 0.95), context_mass=0.6, alpha_s=0.5, max_blocks=3,
                                  min_blocks=2, block_size=32),
        "adaptive_share": ISAConfig(mode="adaptive", mass=0.85, share_plan=True, block_size=32, pseudo_block=16),
        "adaptive_kmeans": ISAConfig(mode="adaptive", mass=0.7, pseudo_block=8, pseudo_keys="kmeans", block_size=32),
    }


def reference_outputs():
    import torch

    from isa_plugin.executors.reference import isa_attention_reference

    out = {}
    for ci, (cname, cfg) in enumerate(reference_configs().items()):
        for li, (lname, spans) in enumerate(LAYOUTS.items()):
            for dtype in (torch.float32, torch.float64):
                q, k, v, layout = _inputs(100 * ci + li, spans, dtype=dtype)
                out[f"{cname}/{lname}/{str(dtype)[6:]}"] = isa_attention_reference(q, k, v, layout, cfg).contiguous()
    return out


def executor_outputs():
    """Needs TRITON_INTERPRET=1 set before triton is imported (run through :func:`main`)."""
    import torch

    from isa_plugin import ISAConfig
    from isa_plugin.executors.flex import flex_attention_call
    from isa_plugin.kernels import executor
    from isa_plugin.selection.fixed_gpu import plan_compact

    out = {}
    fixed = {"fixed_default": ISAConfig(), "fixed_per_head": ISAConfig(alpha_s=(0.25, 1.0), alpha_f=0.25, alpha_ns=(0.5, 0.125))}
    for ci, (cname, cfg) in enumerate(fixed.items()):
        for li, (lname, spans) in enumerate(LAYOUTS.items()):
            for dtype in (torch.float16, torch.float32):
                q, k, v, layout = _inputs(1000 + 10 * ci + li, spans, B=2, H=2, D=64, dtype=dtype)
                cp = plan_compact(q, k, layout, cfg, v=v)
                out[f"triton/{cname}/{lname}/{str(dtype)[6:]}"] = executor.execute_compact(q, k, v, cp, exact_backend="triton").contiguous()
    ada = {"adaptive": ISAConfig(mode="adaptive", mass=0.8, pseudo_block=16),
           "adaptive_ctx": ISAConfig(mode="adaptive", mass=(0.7, 0.95), context_mass=0.6, alpha_s=0.5, max_blocks=3)}
    for ci, (cname, cfg) in enumerate(ada.items()):
        for li, (lname, spans) in enumerate(LAYOUTS.items()):
            q, k, v, layout = _inputs(2000 + 10 * ci + li, spans, B=2, H=2, D=64, dtype=torch.float32)
            out[f"flex/{cname}/{lname}/float32"] = flex_attention_call(q, k, v, layout, cfg, 64 ** -0.5).contiguous()
    return out


def calibrate_profile(name: str, workdir: Path) -> Path:
    """Run ``isa calibrate`` on the tiny pipeline of ``PROFILE_RUNS[name]``; returns the profile path."""
    import torch

    from isa_plugin.cli import main as cli
    from isa_plugin.pipelines.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    family, flags = PROFILE_RUNS[name]
    pipe_dir = workdir / f"pipe_{family}"
    if not pipe_dir.exists():
        build_tiny_pipeline(family).save_pretrained(pipe_dir)
    out = workdir / f"{name}.yaml"
    rc = cli(["calibrate", "--pipeline", str(pipe_dir), "--steps", "2", "--budget", "0.1", "--out", str(out), "--no-progress", *flags])
    assert rc == 0, f"isa calibrate failed for {name}"
    return out


def profile_content(path: Path):
    """(YAML document without the run's volatile keys and sidecar file name, sidecar tensors).

    Layer entries of a mode drop the keys that mode declares legacy (``SelectionMode.legacy_profile_fields``:
    profiles written before the modes were separate listed the fixed mode's unused fields in adaptive
    entries); everything else compares as recorded.
    """
    import yaml
    from safetensors.torch import load_file

    from isa_plugin.selection import get_mode

    doc = yaml.safe_load(Path(path).read_text())
    for name, entry in doc["layers"].items():
        for e in entry["buckets"] if "buckets" in entry else [entry]:
            if "mode" in e:
                for k in get_mode(e["mode"]).legacy_profile_fields:
                    e.pop(k, None)
    for key in VOLATILE:
        doc["calibrated_on"].pop(key, None)
    side = doc.pop("sidecar", None)
    tensors = load_file(str(Path(path).parent / side["file"])) if side else {}
    return doc, tensors


def digest(tensors):
    """name -> (sha256 of the tensor's bytes, dtype, shape, sum): bit-for-bit identity in a few bytes per case."""
    import hashlib

    import torch

    out = {}
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        raw = t.view(torch.uint8) if t.dtype.is_floating_point else t
        out[name] = {"sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(), "dtype": str(t.dtype),
                     "shape": list(t.shape), "sum": float(t.double().sum())}
    return out


def _save(digests, name):
    import json

    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / name).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def main(argv):
    if argv[:1] == ["executors"]:  # child process: TRITON_INTERPRET=1 is set
        import json

        Path(argv[1]).write_text(json.dumps(digest(executor_outputs()), indent=1, sort_keys=True) + "\n")
        return 0
    if argv[:1] != ["record"]:
        print("usage: python tests/golden/cases.py record", file=sys.stderr)
        return 2
    import shutil
    import subprocess
    import tempfile

    _save(digest(reference_outputs()), "reference.json")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, __file__, "executors", str(DATA / "executors.json")], env=env, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROFILE_RUNS:
            path = calibrate_profile(name, Path(tmp))
            shutil.copy(path, DATA / f"{name}.yaml")
            side = path.with_suffix(".safetensors")
            if side.exists():
                shutil.copy(side, DATA / f"{name}.safetensors")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main(sys.argv[1:]))
