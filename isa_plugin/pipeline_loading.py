"""Loading the pipeline a command works on: ``--pipeline`` (folder or hub id), ``--adapter``, ``--device``, ``--dtype``.

Shared by the ``isa`` commands. Every user error (a missing folder, a class neither diffusers nor isa-plugin
has, an adapter that does not serve the pipeline, a bad device or dtype) is a :class:`~isa_plugin.cli.CLIError`
of one line naming the value and the fix. Nothing heavy is imported until a function runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

from .cli import CLIError

__all__ = ["load_pipeline", "load_transformer_skeleton", "resolve_class", "check_adapter", "device_dtype"]

logger = logging.getLogger(__name__)


def device_dtype(device: Optional[str], dtype: Optional[str]) -> Tuple[str, "torch.dtype"]:  # noqa: F821
    """The ``--device`` and ``--dtype`` options as a device string and a torch dtype.

    Args:
        device: ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or None (cuda when a GPU is visible, else cpu).
        dtype: ``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32`` or None (bf16 on cuda, fp32 on cpu).

    Returns:
        ``(device, dtype)``, e.g. ``("cpu", torch.float32)``.

    Raises:
        CLIError: an unknown device name, cuda without a GPU, or an unknown dtype.

    Example:
        >>> device_dtype("cpu", None)
        ('cpu', torch.float32)
    """
    import torch

    from .devices import resolve_device

    try:
        dev = str(resolve_device(device, name="--device"))
    except ValueError as e:
        raise CLIError(str(e)) from None
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None:
        dt = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise CLIError(f"--dtype {dtype}: supported: bf16, fp16, fp32")
    return dev, dt


def resolve_class(name: str):
    """The pipeline class named ``name``: one of isa-plugin's own pipelines, else a diffusers class.

    Args:
        name: a class name as ``model_index.json`` records it (``"LIVEditorPipeline"``, ``"FluxKontextPipeline"``).

    Returns:
        the class.

    Raises:
        CLIError: neither isa-plugin nor the installed diffusers has such a class.

    Example:
        >>> resolve_class("WanInContextEditPipeline").__module__
        'isa_plugin.pipelines.wan_icl'
    """
    try:
        from . import pipelines as own

        if hasattr(own, name):
            return getattr(own, name)
    except ImportError:  # pragma: no cover
        pass
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CLIError(f"pipeline class {name!r} is neither a diffusers pipeline nor one of isa-plugin's")
    return cls


def load_pipeline(path_or_id: str, adapter: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None):
    """Load a diffusers pipeline (local folder or hub id) and check it is served by ``adapter``.

    Components the folder was saved without (``text_encoder=None``) are loaded as None. Loading progress
    bars of diffusers and transformers are turned off.

    Args:
        path_or_id: a folder written by ``save_pretrained`` or a hub id (``org/model``) in the local cache.
        adapter: the isa-plugin adapter that must serve the pipeline (None: not checked).
        device, dtype: as :func:`device_dtype` takes them.

    Returns:
        the pipeline, on ``device`` in ``dtype``.

    Raises:
        CLIError: missing folder, unknown class or adapter, or a pipeline the adapter does not serve.

    Example:
        >>> pipe = load_pipeline("tiny-wan", device="cpu")
    """
    import json

    dev, dt = device_dtype(device, dtype)
    p = Path(path_or_id)
    if p.exists():
        index = p / "model_index.json"
        if not index.is_file():
            raise CLIError(f"--pipeline {path_or_id}: no model_index.json there (save the pipeline with save_pretrained)")
        try:
            cls_name = json.loads(index.read_text())["_class_name"]
        except (ValueError, KeyError) as e:
            raise CLIError(f"--pipeline {path_or_id}: unreadable model_index.json ({e})") from None
    else:
        if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
            raise CLIError(f"--pipeline {path_or_id}: no such folder (and not a hub id such as 'org/model')")
        try:
            from diffusers import DiffusionPipeline

            cls_name = DiffusionPipeline.load_config(path_or_id)["_class_name"]
        except Exception as e:
            raise CLIError(f"--pipeline {path_or_id}: cannot load it from the hub or the local cache ({type(e).__name__})") from None
    cls = resolve_class(cls_name)
    check_adapter(cls, adapter)
    logger.info("loading %s from %s (%s, %s)", cls_name, path_or_id, dev, dt)
    import warnings

    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype -> dtype rename in newer diffusers
            pipe = cls.from_pretrained(path_or_id, torch_dtype=dt, **_absent_components(cls, p))
    except (OSError, ValueError) as e:
        raise CLIError(f"--pipeline {path_or_id}: cannot load {cls_name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return pipe.to(dev)


def _absent_components(cls, folder: Path) -> Dict[str, None]:
    """Components a local pipeline was saved without (e.g. ``text_encoder=None``): passed as None to load it."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
        expected, _ = cls._get_signature_keys(cls)
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: None for name in expected if name not in index or index[name] in (None, [None, None])}


def load_transformer_skeleton(path: str):
    """The pipeline's transformer built from its config on the meta device (no weights read), or None.

    Enough for :meth:`ThresholdProfile.check_compatible` (class, config hash, module names) at no memory
    cost.

    Args:
        path: a local pipeline folder.

    Returns:
        the transformer (parameters on the meta device), or None when the folder is not a local diffusers
        pipeline with a ``transformer`` component of a diffusers class.

    Example:
        >>> load_transformer_skeleton("tiny-wan").__class__.__name__
        'WanTransformer3DModel'
    """
    import json

    import torch

    p = Path(path)
    try:
        index = json.loads((p / "model_index.json").read_text())
        lib, cls_name = index["transformer"]
        cfg = json.loads((p / "transformer" / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if lib != "diffusers":
        return None
    import diffusers

    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        return None
    try:
        with torch.device("meta"):
            return cls.from_config(cfg)
    except Exception as e:  # pragma: no cover - exotic configs: the caller loads the pipeline instead
        logger.info("cannot build %s from its config on the meta device (%s)", cls_name, e)
        return None


def check_adapter(cls, adapter: Optional[str]) -> None:
    """Check that the isa-plugin adapter named ``adapter`` serves pipeline class ``cls``.

    Args:
        cls: a pipeline class.
        adapter: a pipeline or family adapter name (``--adapter``); None checks nothing.

    Raises:
        CLIError: an unknown adapter (lists the known ones), or a pipeline adapter that does not serve ``cls``.

    Example:
        >>> check_adapter(resolve_class("LTXConditionPipeline"), "ltx-condition")
    """
    if adapter is None:
        return
    from .adapters import registered_families, registered_pipelines

    pipes = {a.name: a for a in registered_pipelines().values()}
    fams = {a.name: a for a in registered_families().values()}
    if adapter not in pipes and adapter not in fams:
        known = sorted(set(pipes) | set(fams))
        raise CLIError(f"--adapter {adapter}: unknown adapter; available: {', '.join(known)}")
    if adapter in pipes:
        mro = {c.__name__ for c in cls.__mro__}
        if not mro & set(pipes[adapter].pipeline_classes):
            raise CLIError(f"--adapter {adapter} serves {', '.join(pipes[adapter].pipeline_classes)}, but the pipeline is {cls.__name__}")
