"""Multi-process CPU harness for ISA under diffusers' context parallelism (torch.distributed, gloo).

One :func:`launch` spawns ``world`` processes that run several cases in a row (process start-up and the
diffusers import dominate the cost, so the cases share one launch). Every rank writes its results as JSON;
the tests assert on them. Each case builds its tiny models from the adapter tests' builders.

The processes get three CPU-only shims (they change nothing of what is tested):
- ``torch.accelerator.device_count()`` returns at least 1 (diffusers' ``enable_parallelism`` computes
  ``rank % device_count()``, a ZeroDivisionError on a machine without accelerator);
- ``logging.Logger.warning_once`` (diffusers' split hook calls it; it exists once transformers is imported);
- diffusers' native backend gets a log-sum-exp for ``return_lse=True`` (ring attention needs it; the
  native backend refuses, and no backend that returns it runs on CPU). Calls without ``return_lse`` run
  the original function.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List

import torch

TESTS = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    """A helper module of the other test folders, loaded under a unique name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def builders():
    """The adapter tests' tiny-model builders (tests/adapters/conftest.py), as (conftest, flux, qwenimage)."""
    conf = _load(TESTS / "adapters" / "conftest.py", "_cp_adapters_conftest")
    return conf, conf, conf


# ----------------------------------------------------------------------------- CPU shims
def _native_forward_with_lse(original):
    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        lse = torch.logsumexp(s, dim=-1)  # [B, H, S]
        out = torch.softmax(s, dim=-1) @ v
        return out.permute(0, 2, 1, 3).to(query.dtype), lse.permute(0, 2, 1)

    return forward_op


def cpu_shims() -> None:
    """Install the CPU-only shims described in the module docstring (idempotent)."""
    count = torch.accelerator.device_count
    if not getattr(count, "_cp_shim", False):
        def device_count():
            return max(1, count())

        device_count._cp_shim = True
        torch.accelerator.device_count = device_count
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)
    from diffusers.models import attention_dispatch as ad

    if not getattr(ad._native_attention_forward_op, "_cp_shim", False):
        op = _native_forward_with_lse(ad._native_attention_forward_op)
        op._cp_shim = True
        ad._native_attention_forward_op = op
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


# ----------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, cases: List[str], out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cpu_shims()
        mod = importlib.import_module(module)
        results = {c: getattr(mod, c)() for c in cases}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def launch(world: int, module: str, cases: List[str], out_dir) -> List[Dict]:
    """Run the functions ``cases`` of ``module`` in ``world`` gloo processes; returns each rank's results."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), module, cases, str(out_dir)), nprocs=world, join=True)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
