"""Converting the authors' LIVEditor checkpoint into a ``LIVEditorPipeline`` folder.

:func:`convert_liveditor_checkpoint` validates the checkpoint completely (reading and key mapping:
:mod:`isa_plugin.pipelines.liveditor_weights`), then writes the folder ``LIVEditorPipeline.from_pretrained``
loads: the base Wan pipeline's text encoder, tokenizer and VAE, the authors' sampler and the converted
transformer as safetensors shards, streamed one tensor at a time. ``isa convert-liveditor`` is its command.

Example:
    >>> convert_liveditor_checkpoint("liveditor_ckpt.bin", base="Wan2.2-T2V-A14B-Diffusers", out="liveditor-14b")
    >>> pipe = LIVEditorPipeline.from_pretrained("liveditor-14b", torch_dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import diffusers
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .liveditor import LIVEditorTransformer3DModel
from .liveditor_pipeline import LIVEditorPipeline, liveditor_scheduler
from .liveditor_weights import cast_liveditor_tensor, liveditor_tensor_dtype, read_liveditor_checkpoint, validate_liveditor_checkpoint

__all__ = ["convert_liveditor_checkpoint"]

logger = logging.getLogger(__name__)

_BASE_COMPONENTS = ("text_encoder", "tokenizer", "vae")


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes (int) or e.g. '5GB'")
    unit = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[(m.group(2) or "B").upper()]
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def _shard_plan(keys: List[str], nbytes: Dict[str, int], limit: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    used = 0
    for k in keys:
        if shards[-1] and used + nbytes[k] > limit:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes[k]
    return shards


def convert_liveditor_checkpoint(
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    base: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    torch_dtype: Optional[torch.dtype] = None,
    prefix: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    link_base: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **config: Any,
) -> Path:
    """Write a ``LIVEditorPipeline`` folder: the base Wan pipeline's text encoder, tokenizer and VAE, the
    authors' sampler (:func:`~isa_plugin.pipelines.liveditor_pipeline.liveditor_scheduler`) and the converted
    transformer as safetensors shards.

    The checkpoint is validated completely before anything is written, then streamed: tensors are read
    one at a time (memory-mapped for ``torch.save`` zips and safetensors) and written shard by shard, so
    the peak extra memory is about one shard, never a second copy of the checkpoint.

    Args:
        checkpoint: ``liveditor_ckpt.bin`` (or safetensors, or a state dict), as
            :meth:`LIVEditorTransformer3DModel.from_liveditor_checkpoint` reads it.
        base: a Wan diffusers folder (e.g. ``Wan2.2-T2V-A14B-Diffusers`` or ``Wan2.1-T2V-14B-Diffusers``) with
            ``model_index.json``, ``text_encoder/``, ``tokenizer/`` and ``vae/``.
        out: the folder to write (created; must be empty unless ``overwrite``).
        torch_dtype: store floating tensors in this dtype (default: as in the checkpoint); modules diffusers
            keeps in float32 (``_keep_in_fp32_modules``) stay float32 when it is fp16/bf16.
        prefix: as ``from_liveditor_checkpoint``.
        max_shard_size: bytes per shard (int or ``"5GB"``).
        link_base: hard-link the base's files instead of copying them (same file system only; falls back to
            copying).
        overwrite: replace an existing non-empty ``out``.
        progress: show a progress bar while writing shards.
        **config: transformer config (``WanTransformer3DModel`` names; default the 14B config).

    Returns:
        ``out`` as a Path; load it with ``LIVEditorPipeline.from_pretrained(out)``.

    Raises:
        FileNotFoundError: no checkpoint, or ``base`` lacks a component.
        ValueError: a checkpoint that cannot be read or does not match the config (as
            ``from_liveditor_checkpoint``); a non-empty ``out`` without ``overwrite``; a bad ``max_shard_size``.

    Example:
        >>> convert_liveditor_checkpoint("liveditor_ckpt.bin", "Wan2.2-T2V-A14B-Diffusers", "liveditor-14b")
    """
    cls = LIVEditorTransformer3DModel
    base, out = Path(base), Path(out)
    limit = _parse_size(max_shard_size)
    index_path = base / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{base} is not a diffusers pipeline folder (no model_index.json); pass a Wan diffusers folder as base")
    base_index = json.loads(index_path.read_text())
    absent = [c for c in _BASE_COMPONENTS if not (base / c).is_dir() or c not in base_index]
    if absent:
        raise FileNotFoundError(f"{base} lacks {absent}; the base must be a Wan diffusers pipeline with {list(_BASE_COMPONENTS)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True")

    source = read_liveditor_checkpoint(checkpoint)
    model, mapping = validate_liveditor_checkpoint(cls, source, prefix=prefix, **config)

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tdir = out / "transformer"
    tdir.mkdir()
    model.save_config(tdir)

    def nbytes_of(k: str) -> int:
        dtype = liveditor_tensor_dtype(cls, k, source.dtypes[mapping[k]], torch_dtype)
        return int(torch.Size(source.shapes[mapping[k]]).numel()) * torch.empty((), dtype=dtype).element_size()

    keys = list(mapping)
    nbytes = {k: nbytes_of(k) for k in keys}
    shards = _shard_plan(keys, nbytes, limit)
    weight_map: Dict[str, str] = {}
    bar = tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc="transformer", disable=not progress)
    for i, shard_keys in enumerate(shards, start=1):
        name = "diffusion_pytorch_model.safetensors" if len(shards) == 1 else f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: cast_liveditor_tensor(cls, k, source.get(mapping[k]), torch_dtype).contiguous() for k in shard_keys}
        save_file(tensors, str(tdir / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k in shard_keys})
        bar.update(sum(nbytes[k] for k in shard_keys))
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    copy = _link_or_copy if link_base else shutil.copy2
    for component in _BASE_COMPONENTS:
        logger.info("copying %s from %s", component, base)
        shutil.copytree(base / component, out / component, copy_function=copy)
    liveditor_scheduler().save_pretrained(out / "scheduler")

    index = {"_class_name": LIVEditorPipeline.__name__, "_diffusers_version": diffusers.__version__}
    for component in _BASE_COMPONENTS:
        index[component] = base_index[component]
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    index["transformer"] = [cls.__module__, cls.__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    logger.info("wrote %s (%d tensors in %d shard(s))", out, len(keys), len(shards))
    return out


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)
