"""Reading the authors' LIVEditor checkpoint and mapping its keys onto ``LIVEditorTransformer3DModel``.

The released checkpoint (``liveditor_ckpt.bin``, about 28 GB) is a ``torch.save`` state dict in the
original Wan key naming. Reading it:

- **formats**: a ``torch.save`` zip (read with ``torch.load(weights_only=True, mmap=True)``: no code runs,
  tensors stay on disk until used), a legacy ``torch.save`` pickle (``weights_only=True``, in memory), or
  ``.safetensors``. The format is recognised from the file's first bytes, not its name.
- **wrappers**: a top-level ``state_dict`` / ``module`` / ``weights`` entry holding the state dict
  (nested wrappers too); top-level training entries (:data:`SKIPPED_ENTRIES`: optimizer, scheduler,
  step counters) are skipped.
- **key prefixes** :data:`KEY_PREFIXES` (``model.``, ``model_ema.``,
  ``wanx_unimodel.guidance_model.feedforward_model.``) are removed; ``vae.*`` entries are skipped;
  LoRA-style ``.weight.lora`` becomes ``.lora.`` (such entries have no place in the model and are
  reported as unexpected keys).
- **key names**: :data:`KEY_TABLE`, original name → diffusers name (``None``: dropped, the unused
  ``alpha_2`` gates and the cross-attention gates).

Anything else is an error that names the keys: missing keys, unexpected keys, shapes that do not match
the model config, two entries that map to one key (pass ``prefix=`` to pick a copy).

This module takes the model class as an argument and imports nothing of the package's pipelines: the
model (:meth:`LIVEditorTransformer3DModel.from_liveditor_checkpoint`) and the converter to a pipeline
folder (:mod:`isa_plugin.pipelines.liveditor_convert`) both build on it.

Example:
    >>> source = read_liveditor_checkpoint("liveditor_ckpt.bin")
    >>> model, mapping = validate_liveditor_checkpoint(LIVEditorTransformer3DModel, source)   # 14B config
    >>> model = LIVEditorTransformer3DModel.from_liveditor_checkpoint("liveditor_ckpt.bin", torch_dtype=torch.bfloat16)
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "KEY_TABLE",
    "KEY_PREFIXES",
    "WRAPPER_KEYS",
    "SKIPPED_ENTRIES",
    "read_liveditor_checkpoint",
    "map_liveditor_keys",
    "validate_liveditor_checkpoint",
    "liveditor_tensor_dtype",
    "cast_liveditor_tensor",
    "load_liveditor_transformer",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- tables
#: original (authors') key → diffusers ``LIVEditorTransformer3DModel`` key; ``{n}`` is a block index,
#: ``{p}`` is ``weight`` or ``bias``. ``None``: present in the checkpoint, unused by the model, dropped.
KEY_TABLE: Tuple[Tuple[str, Optional[str]], ...] = (
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("source_video_embedding_more_memory.{p}", "source_patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("blocks.{n}.self_attn.q.{p}", "blocks.{n}.attn1.to_q.{p}"),
    ("blocks.{n}.self_attn.k.{p}", "blocks.{n}.attn1.to_k.{p}"),
    ("blocks.{n}.self_attn.v.{p}", "blocks.{n}.attn1.to_v.{p}"),
    ("blocks.{n}.self_attn.o.{p}", "blocks.{n}.attn1.to_out.0.{p}"),
    ("blocks.{n}.self_attn.norm_q.{p}", "blocks.{n}.attn1.norm_q.{p}"),
    ("blocks.{n}.self_attn.norm_k.{p}", "blocks.{n}.attn1.norm_k.{p}"),
    ("blocks.{n}.self_attn.alpha_1.{p}", "blocks.{n}.attn1.alpha_1.{p}"),
    ("blocks.{n}.self_attn.alpha_2.{p}", None),
    ("blocks.{n}.cross_attn.q.{p}", "blocks.{n}.attn2.to_q.{p}"),
    ("blocks.{n}.cross_attn.k.{p}", "blocks.{n}.attn2.to_k.{p}"),
    ("blocks.{n}.cross_attn.v.{p}", "blocks.{n}.attn2.to_v.{p}"),
    ("blocks.{n}.cross_attn.o.{p}", "blocks.{n}.attn2.to_out.0.{p}"),
    ("blocks.{n}.cross_attn.norm_q.{p}", "blocks.{n}.attn2.norm_q.{p}"),
    ("blocks.{n}.cross_attn.norm_k.{p}", "blocks.{n}.attn2.norm_k.{p}"),
    ("blocks.{n}.cross_attn.alpha_1.{p}", None),
    ("blocks.{n}.cross_attn.alpha_2.{p}", None),
    ("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),
    ("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
    ("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
)

#: top-level entries that hold the state dict (checked in this order, repeatedly)
WRAPPER_KEYS: Tuple[str, ...] = ("state_dict", "module", "weights")
#: key prefixes removed (repeatedly, in any order)
KEY_PREFIXES: Tuple[str, ...] = ("model_ema.", "model.", "wanx_unimodel.guidance_model.feedforward_model.")
#: top-level training entries skipped
SKIPPED_ENTRIES: Tuple[str, ...] = (
    "optimizer", "optimizer_state_dict", "optimizer_states", "lr_scheduler", "lr_schedulers", "scheduler",
    "epoch", "step", "global_step", "iteration",
)
_SKIPPED_KEY_PREFIXES = ("vae.",)
_LORA_RENAME = (".weight.lora", ".lora.")

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PARAM = re.compile(r"\.(weight|bias)$")
_FORWARD: Dict[str, Optional[str]] = dict(KEY_TABLE)
_BACKWARD: Dict[str, str] = {d: o for o, d in KEY_TABLE if d is not None}


def _generic(key: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``blocks.3.self_attn.q.weight`` → (``blocks.{n}.self_attn.q.{p}``, ``"3"``, ``"weight"``)."""
    n = p = None
    m = _BLOCK.match(key)
    if m:
        n = m.group(1)
        key = "blocks.{n}." + key[m.end():]
    m = _PARAM.search(key)
    if m:
        p = m.group(1)
        key = key[: m.start()] + ".{p}"
    return key, n, p


def _fill(pattern: str, n: Optional[str], p: Optional[str]) -> str:
    return pattern.replace("{n}", n if n is not None else "{n}").replace("{p}", p if p is not None else "{p}")


def _translate(key: str, table: Mapping[str, Optional[str]]) -> Tuple[bool, Optional[str]]:
    """(known, translated key or None) of ``key`` through ``table`` (:data:`KEY_TABLE` or its inverse)."""
    generic, n, p = _generic(key)
    if generic not in table:
        return False, None
    target = table[generic]
    return True, None if target is None else _fill(target, n, p)


# ---------------------------------------------------------------------------------------------- reading
class _TensorSource:
    """Lazy tensors of one checkpoint: ``keys``, ``shape(key)``, ``dtype(key)``, ``get(key)``."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], dtypes: Dict[str, torch.dtype], getter: Callable[[str], torch.Tensor], name: str):
        self.shapes, self.dtypes, self._get, self.name = shapes, dtypes, getter, name

    def keys(self) -> List[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _open_safetensors(path: Path) -> _TensorSource:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        shapes, dtypes = {}, {}
        for key in handle.keys():
            piece = handle.get_slice(key)
            shapes[key] = tuple(piece.get_shape())
            dtypes[key] = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
    except Exception as e:  # SafetensorError and friends
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e

    def get(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{path}: could not read tensor {key!r} (truncated or corrupt file?): {e}") from e

    return _TensorSource(shapes, dtypes, get, str(path))


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if found:  # the weights-only unpickler met a class or function reference
            raise ValueError(
                f"refusing {path}: it holds Python objects other than tensors and plain containers, and loading them "
                f"could run code ({found[0][:160]}). If you trust the file, re-save only its state dict: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'clean.bin')"
            ) from e
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt pickle: {str(e).splitlines()[-1][:160]})") from e
    except Exception as e:
        text = str(e)
        if "central directory" in text or "PytorchStreamReader" in text:
            raise ValueError(f"{path} is truncated or corrupt (its zip archive cannot be read): {text.splitlines()[0]}") from e
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt?): {type(e).__name__}: {text.splitlines()[0] if text else ''}") from e


def _open_path(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the checkpoint file itself (e.g. {path / 'liveditor_ckpt.bin'})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return _torch_load(path, mmap=True)
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if header_len > size - 8:
            raise ValueError(f"{path} is a truncated safetensors file (header of {header_len} bytes, file of {size})")
        return _open_safetensors(path)
    if head[:1] == b"\x80":  # a legacy (pre-zip) torch.save pickle
        return _torch_load(path, mmap=False)
    raise ValueError(
        f"{path} is neither a PyTorch checkpoint nor a safetensors file (first bytes {head[:8]!r}); "
        "pass the authors' liveditor_ckpt.bin or a .safetensors export of it"
    )


def _unwrap(obj: Any, where: str) -> Dict[str, torch.Tensor]:
    """Follow :data:`WRAPPER_KEYS`, skip :data:`SKIPPED_ENTRIES`; a flat {name: tensor} dict or ValueError."""
    while isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} does not hold a state dict (found a {type(obj).__name__}); expected {{name: tensor}}")
    tensors, foreign = {}, []
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif key not in SKIPPED_ENTRIES:
            foreign.append(f"{key} ({type(value).__name__})")
    if foreign:
        raise ValueError(f"{where} holds entries that are not tensors: {', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}")
    if not tensors:
        raise ValueError(f"{where} holds no tensors")
    return tensors


def read_liveditor_checkpoint(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]]) -> _TensorSource:
    """Open the authors' checkpoint lazily (no tensor data read yet, except for legacy pickles).

    Args:
        path_or_state_dict: a file (``torch.save`` zip or legacy pickle, or safetensors) or a state dict.

    Returns:
        a tensor source (``keys()``, ``shapes``, ``dtypes``, ``get(key)``) over the file's own key names,
        wrappers removed (prefixes not yet: see :func:`map_liveditor_keys`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, a truncated / corrupt / foreign file, a file carrying Python objects (code),
            or a top level that is not a state dict.

    Example:
        >>> source = read_liveditor_checkpoint("liveditor_ckpt.bin"); len(source.keys())
    """
    if isinstance(path_or_state_dict, Mapping):
        obj, where = path_or_state_dict, "the state dict"
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        obj, where = _open_path(path), str(path)
        if isinstance(obj, _TensorSource):
            return obj
    else:
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(path_or_state_dict).__name__}")
    tensors = _unwrap(obj, where)
    return _TensorSource(
        {k: tuple(t.shape) for k, t in tensors.items()}, {k: t.dtype for k, t in tensors.items()}, tensors.__getitem__, where
    )


# ---------------------------------------------------------------------------------------------- mapping
def _strip(key: str, prefix: Optional[str]) -> Optional[str]:
    """The key without wrappers' prefixes; None when it is skipped (vae.*, or outside ``prefix``)."""
    if prefix is not None:
        if not key.startswith(prefix):
            return None
        key = key[len(prefix):]
    changed = True
    while changed:
        changed = False
        for p in KEY_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    if key.startswith(_SKIPPED_KEY_PREFIXES):
        return None
    return key.replace(*_LORA_RENAME)


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def map_liveditor_keys(keys: Iterable[str], *, prefix: Optional[str] = None) -> Tuple[Dict[str, str], List[str], List[str]]:
    """Translate the checkpoint's key names into ``LIVEditorTransformer3DModel``'s.

    Args:
        keys: the checkpoint's keys (wrappers removed).
        prefix: keep only keys under this prefix (removed before the others).

    Returns:
        ``(mapping, dropped, unknown)``: ``mapping`` diffusers key → checkpoint key; ``dropped`` the
        checkpoint keys the model does not use (``alpha_2``, cross-attention gates); ``unknown`` the
        checkpoint keys that are in no table (unexpected).

    Raises:
        ValueError: two checkpoint keys map to one model key (e.g. ``model.`` and ``model_ema.`` copies);
            the message says which ``prefix=`` selects one.

    Example:
        >>> mapping, dropped, unknown = map_liveditor_keys(["model.head.modulation"])
        >>> mapping
        {'scale_shift_table': 'model.head.modulation'}
    """
    mapping: Dict[str, str] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    for key in keys:
        stripped = _strip(key, prefix)
        if stripped is None:
            continue
        known, target = _translate(stripped, _FORWARD)
        if not known:
            unknown.append(key)
        elif target is None:
            dropped.append(key)
        elif target in mapping:
            first = mapping[target]
            raise ValueError(
                f"checkpoint keys {first!r} and {key!r} both map to {target!r} (several copies of the weights?); "
                f"pass prefix= to choose one, e.g. prefix={first[: len(first) - len(stripped)]!r} or prefix={key[: len(key) - len(stripped)]!r}"
            )
        else:
            mapping[target] = key
    return mapping, dropped, unknown


def _expected_shapes(cls, config: Dict[str, Any]) -> Tuple[Any, Dict[str, Tuple[int, ...]]]:
    """An empty-weight model of ``config`` (real buffers, parameters on the meta device) and its state-dict shapes."""
    import inspect

    from accelerate import init_empty_weights

    allowed = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    bad = sorted(set(config) - set(allowed))
    if bad:
        raise ValueError(f"unknown config key(s) {bad} for {cls.__name__}; supported: {allowed}")
    with init_empty_weights():
        model = cls(**config)
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _validated_mapping(source: _TensorSource, expected: Dict[str, Tuple[int, ...]], prefix: Optional[str], config_text: str) -> Dict[str, str]:
    """mapping diffusers key → checkpoint key, checked complete and shape-exact; ValueError naming every problem."""
    mapping, dropped, unknown = map_liveditor_keys(source.keys(), prefix=prefix)
    if not mapping and not dropped:
        raise ValueError(
            f"{source.name} holds no LIVEditor / Wan transformer weights (first keys: {_listing(source.keys(), 6)})"
            + (f" under prefix={prefix!r}" if prefix else "")
        )
    missing = sorted(set(expected) - set(mapping))
    unexpected = sorted(unknown) + sorted(mapping[k] for k in set(mapping) - set(expected))
    problems = []
    if missing:
        originals = [_translate(k, _BACKWARD)[1] or k for k in missing]
        problems.append(f"{len(missing)} missing key(s) (original names): {_listing(originals)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if problems:
        blocks = {int(_BLOCK.match(k).group(1)) for k in mapping if _BLOCK.match(k)}
        hint = f"; the checkpoint has {max(blocks) + 1} blocks" if blocks else ""
        if any(_strip(k, prefix) in expected for k in unknown):
            hint += (" (its keys use diffusers' naming, e.g. 'blocks.0.attn1.to_q.weight': this reader takes the authors' "
                     "checkpoint; a converted folder loads with from_pretrained)")
        raise ValueError(f"{source.name} does not match {config_text}{hint}: " + "; ".join(problems))
    wrong = [
        f"{mapping[k]} {source.shapes[mapping[k]]} vs {k} {expected[k]}"
        for k in expected if tuple(source.shapes[mapping[k]]) != expected[k]
    ]
    if wrong:
        raise ValueError(
            f"{source.name}: {len(wrong)} tensor shape(s) differ from {config_text} (pass the checkpoint's config): {_listing(wrong, 6)}"
        )
    if dropped:
        logger.info("dropping %d unused checkpoint entries (alpha_2 and cross-attention gates)", len(dropped))
    return mapping


def validate_liveditor_checkpoint(cls, source: _TensorSource, *, prefix: Optional[str] = None, **config: Any) -> Tuple[Any, Dict[str, str]]:
    """Check a checkpoint against a model config completely, before any tensor data is read.

    Args:
        cls: the model class (:class:`~isa_plugin.pipelines.LIVEditorTransformer3DModel`).
        source: the checkpoint, as :func:`read_liveditor_checkpoint` opens it.
        prefix: keep only keys under this prefix (e.g. ``"model_ema."``).
        **config: model config with :class:`WanTransformer3DModel`'s names; default: ``cls``'s defaults.

    Returns:
        ``(model, mapping)``: an empty-weight model of ``config`` (parameters on the meta device, real
        buffers) and ``mapping`` diffusers key → checkpoint key, in the model's state-dict order, complete
        and shape-exact.

    Raises:
        ValueError: an unknown config key; a checkpoint with no transformer weights; missing or unexpected
            keys (named, with the checkpoint's block count); shapes that do not match the config; two
            copies of the weights without ``prefix``.

    Example:
        >>> model, mapping = validate_liveditor_checkpoint(LIVEditorTransformer3DModel, read_liveditor_checkpoint(sd),
        ...                                                num_layers=2, num_attention_heads=2, attention_head_dim=32)
    """
    model, expected = _expected_shapes(cls, config)
    mapping = _validated_mapping(source, expected, prefix, _config_text(cls, model))
    return model, {k: mapping[k] for k in expected}


def _keep_fp32(cls, name: str) -> bool:
    """diffusers' rule for ``_keep_in_fp32_modules``: a module name among the key's dotted parts."""
    parts = name.split(".")
    return any(m in parts for m in (getattr(cls, "_keep_in_fp32_modules", None) or ()))


def liveditor_tensor_dtype(cls, key: str, dtype: torch.dtype, torch_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded or stored in.

    Args:
        cls: the model class (its ``_keep_in_fp32_modules`` apply).
        key: the tensor's diffusers key.
        dtype: the tensor's dtype in the checkpoint.
        torch_dtype: the requested dtype, or None to keep the checkpoint's.

    Returns:
        ``dtype`` when ``torch_dtype`` is None or the tensor is not floating point; float32 for modules
        diffusers keeps in float32 when ``torch_dtype`` is fp16/bf16; ``torch_dtype`` otherwise.

    Example:
        >>> liveditor_tensor_dtype(LIVEditorTransformer3DModel, "blocks.0.attn1.to_q.weight", torch.float32, torch.bfloat16)
        torch.bfloat16
    """
    if torch_dtype is None or not dtype.is_floating_point:
        return dtype
    if torch_dtype in (torch.float16, torch.bfloat16) and _keep_fp32(cls, key):
        return torch.float32
    return torch_dtype


def cast_liveditor_tensor(cls, key: str, tensor: torch.Tensor, torch_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``tensor`` in :func:`liveditor_tensor_dtype`'s dtype (the tensor itself when that is its own).

    Example:
        >>> w = cast_liveditor_tensor(LIVEditorTransformer3DModel, key, source.get(mapping[key]), torch.bfloat16)
    """
    return tensor.to(liveditor_tensor_dtype(cls, key, tensor.dtype, torch_dtype))


def _config_text(cls, model) -> str:
    c = model.config
    return (
        f"{cls.__name__}(num_layers={c.num_layers}, num_attention_heads={c.num_attention_heads}, "
        f"attention_head_dim={c.attention_head_dim}, ffn_dim={c.ffn_dim}, text_dim={c.text_dim}, freq_dim={c.freq_dim}, "
        f"in_channels={c.in_channels}, out_channels={c.out_channels})"
    )


def load_liveditor_transformer(cls, path_or_state_dict, *, torch_dtype: Optional[torch.dtype] = None, prefix: Optional[str] = None, **config):
    """Implementation of :meth:`LIVEditorTransformer3DModel.from_liveditor_checkpoint` (see there)."""
    source = read_liveditor_checkpoint(path_or_state_dict)
    model, mapping = validate_liveditor_checkpoint(cls, source, prefix=prefix, **config)
    state = {k: cast_liveditor_tensor(cls, k, source.get(mapping[k]), torch_dtype) for k in mapping}
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %d tensors from %s", len(state), source.name)
    return model.eval()
