"""Cases run inside the gloo processes of :mod:`cp_harness` (each returns JSON-able results of its rank)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from cp_harness import builders
from isa_plugin import ISAConfig
from isa_plugin.adapters import apply_isa, remove_isa, stats


def per_head(heads: int) -> ISAConfig:
    """Sparse per-head ratios (different for every head) with blocks small enough for tiny sequences."""
    ramp = [i / max(1, heads - 1) for i in range(heads)]
    return ISAConfig(alpha_s=tuple(0.25 + 0.5 * r for r in ramp), alpha_f=tuple(0.5 - 0.25 * r for r in ramp),
                     alpha_ns=tuple(0.125 + 0.125 * r for r in ramp), block_size=8)


def _fwd(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


_MESHES: Dict[Any, Any] = {}


def _enable(model, cp_plan=None, **cp) -> None:
    """``enable_parallelism`` with one device mesh per (ring, ulysses) shape and process: creating gloo
    groups is the slow part of an enable, and the cases would otherwise create new ones for every model."""
    from torch.distributed.device_mesh import init_device_mesh

    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(**cp)
    if config.mesh_shape not in _MESHES:
        _MESHES[config.mesh_shape] = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    config.mesh = _MESHES[config.mesh_shape]
    model.enable_parallelism(config=config, cp_plan=cp_plan)


def family_case(build: Callable, inputs: Dict[str, Any], config: ISAConfig, layout=None, *, stock_cp: bool = True,
                **cp) -> Dict[str, Any]:
    """ISA under context parallelism against single-process ISA, in both orders of apply and enable, and
    remove / re-apply against the stock parallel output.

    Returns (this rank): ``single_isa_vs_dense`` (how far ISA is from dense on one process: the comparison
    must not be trivial), ``apply_first`` / ``enable_first`` (max |ISA-CP − single ISA|), their ``stats``,
    and with ``stock_cp``: ``stock_cp_vs_single`` (stock CP − stock single, informational),
    ``removed_after_apply_first`` / ``removed_after_enable_first`` (output after ``remove_isa`` − stock CP
    output) and ``reapplied`` (re-applied ISA − first ISA under CP).
    """
    kw = {} if layout is None else {"layout": layout}
    a = build()
    dense = _fwd(a, inputs)
    apply_isa(a, config, **kw)
    single = _fwd(a, inputs)
    remove_isa(a)
    res: Dict[str, Any] = {"single_isa_vs_dense": _diff(single, dense)}

    apply_isa(a, config, **kw)  # order 1: apply, then enable
    _enable(a, **cp)
    res["apply_first"] = _diff(_fwd(a, inputs), single)
    res["apply_first_stats"] = stats(a)
    remove_isa(a)
    removed_a = _fwd(a, inputs)

    if stock_cp:
        b = build()  # order 2: enable (stock parallel output), then apply
        _enable(b, **cp)
        stock = _fwd(b, inputs)
        res["stock_cp_vs_single"] = _diff(stock, dense)
        res["removed_after_apply_first"] = _diff(removed_a, stock)
        apply_isa(b, config, **kw)
        first = _fwd(b, inputs)
        res["enable_first"] = _diff(first, single)
        res["enable_first_stats"] = stats(b)
        remove_isa(b)
        res["removed_after_enable_first"] = _diff(_fwd(b, inputs), stock)
        apply_isa(b, config, **kw)
        res["reapplied"] = _diff(_fwd(b, inputs), first)
    return res


def _wan(heads: int = 2):
    conf, _, _ = builders()
    return lambda: conf.tiny_wan(num_attention_heads=heads)


def _wan_inputs(frames: int = 6, size: int = 16):
    conf, _, _ = builders()
    return conf.wan_inputs(frames=frames, size=size)


def _wan_layout(context_frames: int = 3):
    from isa_plugin.adapters.families.wan import WanICLLayout

    return WanICLLayout(context_frames=context_frames)


# ----------------------------------------------------------------------------- cases (2 processes)
def wan() -> Dict[str, Any]:
    return family_case(_wan(2), _wan_inputs(), per_head(2), _wan_layout(), ulysses_degree=2)


def wan_uneven() -> Dict[str, Any]:
    """``ulysses_anything``: 3 heads over 2 ranks (diffusers' Ulysses-anything exchange; rank 0 computes two
    heads, rank 1 one). Uneven shards cannot be tried on gloo: diffusers' output gather needs equal sizes there."""
    return family_case(_wan(3), _wan_inputs(), per_head(3), _wan_layout(), ulysses_degree=2, ulysses_anything=True)


def ltx2() -> Dict[str, Any]:
    """Stock diffusers 0.42.1 cannot run LTX-2 under Ulysses as shipped: its ``_cp_plan`` leaves the
    audio-video cross-attention RoPE (``cross_attn_rope``) unsplit, and the masked text cross-attention fails
    to broadcast its mask. The plan here adds the missing split and the inputs carry no text masks; the video
    self-attention ISA serves is unaffected by either."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    conf, _, _ = builders()
    model_cls = type(conf.tiny_ltx2(num_layers=1))
    plan = dict(model_cls._cp_plan)
    plan["cross_attn_rope"] = {i: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True) for i in (0, 1)}
    x = conf.ltx2_inputs(extra_tokens=32)
    x.update(encoder_attention_mask=None, audio_encoder_attention_mask=None)
    return family_case(conf.tiny_ltx2, x, per_head(2), ulysses_degree=2, cp_plan=plan)


def flux_kontext() -> Dict[str, Any]:
    _, flux, _ = builders()
    return family_case(flux.tiny_flux, flux.flux_inputs(batch=1), per_head(2), ulysses_degree=2)


def qwenimage_text_mask() -> Dict[str, Any]:
    """Batch 2 with padded text (12 and 5 valid tokens): the text mask is gathered like the tokens."""
    _, _, qwen = builders()
    return family_case(qwen.tiny_qwen, qwen.qwen_inputs(batch=2, text_valid=[12, 5]), per_head(2), ulysses_degree=2)


def wan_ring() -> Dict[str, Any]:
    """Ring attention: every ISA layer falls back (counted) and the output is the stock ring output."""
    model = _wan(2)()
    _enable(model, ring_degree=2)
    x = _wan_inputs()
    stock = _fwd(model, x)
    apply_isa(model, per_head(2), layout=_wan_layout())
    out = _fwd(model, x)
    return {"vs_stock_ring": _diff(out, stock), "stats": stats(model)}


# ----------------------------------------------------------------------------- cases (4 processes)
def wan_p4() -> Dict[str, Any]:
    return family_case(_wan(4), _wan_inputs(), per_head(4), _wan_layout(), ulysses_degree=4)


# ----------------------------------------------------------------------------- LIVEditor (gated coarse residual)
def _liveditor_case(heads: int, world: int) -> Dict[str, Any]:
    """ISA + the trained gate under Ulysses against single-process ISA + gate (apply then enable, enable then
    apply), and with one layer left dense (its fallback keeps the residual); counters equal single-process ones.

    Returns (this rank): ``single_isa_vs_dense``, ``stock_cp_raised`` (the stock processor's refusal),
    ``apply_first``, ``enable_first``, ``mixed`` (max diffs) and
    ``*_stats_equal`` (CP counters == single-process counters)."""
    from isa_plugin.adapters import reset_stats

    conf, _, _ = builders()
    from isa_plugin.adapters.families.liveditor import liveditor_cp_plan

    layers = 2
    x = conf.liveditor_inputs()
    cfg = per_head(heads)
    mixed = {"blocks.0.attn1": None, "blocks.1.attn1": cfg}

    def build():
        return conf.tiny_liveditor(num_layers=layers, num_attention_heads=heads)

    plan = liveditor_cp_plan(build())

    res: Dict[str, Any] = {}
    singles = {}
    for name, c in (("isa", cfg), ("mixed", mixed)):
        m = build()
        apply_isa(m, c)
        singles[name] = (_fwd(m, x), stats(m))
        if name == "isa":
            remove_isa(m)
            res["single_isa_vs_dense"] = _diff(singles[name][0], _fwd(m, x))
    single, single_stats = singles["isa"]

    a = build()
    apply_isa(a, cfg)
    _enable(a, ulysses_degree=world, cp_plan=plan)
    res["apply_first"] = _diff(_fwd(a, x), single)
    res["apply_first_stats_equal"] = stats(a) == single_stats

    b = build()
    _enable(b, ulysses_degree=world, cp_plan=plan)
    try:  # the model's own processor is not context-parallel: it refuses
        _fwd(b, x)
        res["stock_cp_raised"] = None
    except RuntimeError as exc:
        res["stock_cp_raised"] = str(exc)
    apply_isa(b, cfg)
    res["enable_first"] = _diff(_fwd(b, x), single)
    res["enable_first_stats_equal"] = stats(b) == single_stats
    remove_isa(b)
    apply_isa(b, mixed)
    reset_stats(b)
    res["mixed"] = _diff(_fwd(b, x), singles["mixed"][0])
    res["mixed_stats_equal"] = stats(b) == singles["mixed"][1]
    res["mixed_stats"] = stats(b)
    return res


def liveditor() -> Dict[str, Any]:
    return _liveditor_case(2, 2)


def liveditor_ring() -> Dict[str, Any]:
    """Ring attention cannot give a rank every token of its heads: a gated call raises (before any collective)."""
    conf, _, _ = builders()
    from isa_plugin.adapters.families.liveditor import liveditor_cp_plan

    m = conf.tiny_liveditor(num_layers=2)
    _enable(m, ring_degree=2, cp_plan=liveditor_cp_plan(m))
    apply_isa(m, per_head(2))
    try:
        _fwd(m, conf.liveditor_inputs())
    except RuntimeError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def liveditor_p4() -> Dict[str, Any]:
    return _liveditor_case(4, 4)
