"""The ``isa`` command line (also ``python -m isa_plugin``): a thin shell over the library.

Built-in commands: ``calibrate``, ``inspect``, ``validate`` (and ``demo``, ``eval``, ``convert-liveditor`` from the extension modules). Adding one elsewhere is a few lines::

    # isa_plugin/demo_cli.py
    from isa_plugin.cli import command

    @command("demo", help="run a pipeline with and without ISA", arguments=lambda p: p.add_argument("--pipeline"))
    def demo(args):
        ...                      # raise CLIError("...") (or ValueError) for a user error: one line, exit 2
        return 0

and list the module in :data:`EXTENSION_MODULES` (or expose it through the ``isa_plugin.cli`` entry-point
group of another package). User errors (bad arguments, missing or corrupt files, profiles that do not fit
the model) print one line ``isa: error: ...`` and exit non-zero without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["main", "command", "register_command", "CLIError", "EXTENSION_MODULES", "load_pipeline", "budget_arg"]

logger = logging.getLogger("isa_plugin.cli")

#: modules imported by :func:`main` so their ``@command`` registrations take effect (missing ones are skipped)
EXTENSION_MODULES: List[str] = ["isa_plugin.profile_cli", "isa_plugin.demo_cli", "isa_plugin.eval_cli", "isa_plugin.liveditor_cli"]


class CLIError(Exception):
    """A user error: printed as one line, exit status ``code`` (default 2)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], Optional[int]]
    arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    description: Optional[str] = None
    epilog: Optional[str] = None  # printed after the options as written (line breaks kept)


_COMMANDS: Dict[str, Command] = {}


def register_command(name: str, run: Callable[[argparse.Namespace], Optional[int]], *, help: str,
                     arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None, description: Optional[str] = None,
                     epilog: Optional[str] = None) -> Command:
    """Add a subcommand: ``arguments(parser)`` declares its options, ``run(args)`` returns the exit status.

    ``description`` is wrapped to the terminal; ``epilog`` (shown after the options) keeps its line breaks.
    """
    if name in _COMMANDS and _COMMANDS[name].run is not run:
        raise ValueError(f"isa subcommand {name!r} is already registered")
    cmd = Command(name, help, run, arguments, description, epilog)
    _COMMANDS[name] = cmd
    return cmd


def command(name: str, *, help: str, arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
            description: Optional[str] = None):
    """Decorator form of :func:`register_command`."""
    def deco(run):
        register_command(name, run, help=help, arguments=arguments, description=description or run.__doc__)
        return run

    return deco


def _load_extensions() -> None:
    for mod in EXTENSION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="isa_plugin.cli"):
            ep.load()
    except Exception as e:  # pragma: no cover - broken third-party plugin
        logger.warning("could not load an isa CLI plugin: %s", e)


# ================================================================================= helpers
def budget_arg(name: str = "budget") -> Callable[[str], float]:
    """An argparse ``type`` for error budgets: every command checks its budget at parse time, in one way.

    The value goes through :func:`isa_plugin.config.validate_budget`, so ``--budget 2`` or ``--budget 0``
    stops the command with the validator's message before anything is loaded.

    Args:
        name: how the value is named in the message (``"budget"``, ``"context budget"``).

    Returns:
        a function ``str -> float`` for ``parser.add_argument(..., type=budget_arg())``.

    Example:
        >>> p.add_argument("--budget", type=budget_arg(), default=0.05)
    """

    def parse(text: str) -> float:
        from .validation import validate_budget

        try:
            value = float(text)
        except ValueError:
            value = text  # the validator names the non-number
        try:
            return validate_budget(value, name=name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "budget"
    return parse


def _device_dtype(device: Optional[str], dtype: Optional[str]):
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

    Raises:
        CLIError: missing folder, unknown class or adapter, or a pipeline the adapter does not serve.
    """
    import json

    dev, dt = _device_dtype(device, dtype)
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
    cost; None when the folder is not a local diffusers pipeline with a ``transformer`` component.
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


def fmt_ratio(v) -> str:
    if isinstance(v, tuple):
        return f"{sum(v) / len(v):.3g}*"
    return f"{v:.4g}"


def fmt(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


# ================================================================================= calibrate
def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, help="pipeline folder (save_pretrained) or hub id; its family is detected")
    p.add_argument("--adapter", help="isa-plugin adapter serving the pipeline (default: detected from the pipeline class; "
                                     "checked against it)")
    p.add_argument("--inputs", "--videos", dest="inputs", nargs="+", metavar="INPUT",
                   help="calibration samples: video files (mp4/gif/webm), images, or folders of frames; what each is for the "
                        "pipeline is listed below (default: the bundled sample videos)")
    p.add_argument("--prompts", nargs="*", default=None, metavar="PROMPT", help="one prompt, or one per sample (default: empty)")
    p.add_argument("--budget", type=budget_arg(), default=0.05, help="relative L1 error budget of the attention output, in (0, 1) (default 0.05)")
    p.add_argument("--context-budget", type=budget_arg("context_budget"), default=None, help="separate budget for context-query outputs, in (0, 1) (default: --budget)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the schedule (default 10; the run stops after the last measured step)")
    p.add_argument("--calib-steps", type=int, default=4, help="steps measured, spread over the schedule (default 4)")
    p.add_argument("--height", type=int, help="resize videos to this height")
    p.add_argument("--width", type=int, help="resize videos to this width")
    p.add_argument("--frames", type=int, help="use the first N frames of each video")
    p.add_argument("--out", required=True, help="profile to write (YAML; per-head values go to a .safetensors sidecar)")
    p.add_argument("--block-size", type=int, default=64, help="ISA block size (default 64)")
    p.add_argument("--blocks-per-kind", type=int, default=48, help="query blocks sampled per kind and call (default 48)")
    p.add_argument("--tokens-per-block", type=int, default=16, help="tokens sampled per sampled block (default 16)")
    p.add_argument("--timestep-buckets", type=int, default=1, help="separate settings per timestep bucket (default 1)")
    p.add_argument("--per-head", choices=("auto", "always", "off"), default="auto", help="per-head ratios (default: where they pay)")
    p.add_argument("--margin", type=float, default=0.85, help="fit to margin x budget (sampling noise; default 0.85)")
    p.add_argument("--mode", dest="modes", action="append", metavar="MODE",
                   help="a selection mode to measure; repeat for several (default: fixed); each layer keeps the cheapest "
                        "mode within budget. Modes: " + ", ".join(_mode_names()))
    p.add_argument("--adaptive", dest="modes", action="append_const", const="adaptive",
                   help="short for --mode fixed --mode adaptive (docs/ADAPTIVE.md)")
    p.add_argument("--cost-model", help="kernel cost model JSON (default: isa_plugin/kernels/cost_model.json if present)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale passed to the pipeline")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-stats", help="also save the raw statistics (torch.save) for refitting")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mode_names():
    from .selection import registered_modes

    return list(registered_modes())


def _calibrate(args) -> int:
    import time

    from .calibration.cost import load_cost_model
    from .calibration.fit import fit_profile, parse_budget
    from .calibration.recorder import record

    if args.steps < 1 or args.calib_steps < 1:
        raise CLIError("--steps and --calib-steps must be at least 1")
    budget = parse_budget((args.budget, args.context_budget if args.context_budget is not None else args.budget))
    if args.inputs is None:
        from .calibration.video import sample_media_paths

        args.inputs = [str(p) for p in sample_media_paths()]
    for v in args.inputs:
        if not Path(v).exists():
            raise CLIError(f"input {v!r} does not exist")
    cost_model = load_cost_model(args.cost_model) if args.cost_model else load_cost_model()
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {args.out} is a folder; give a file name such as profile.yaml")
    grid = None
    if args.modes:
        from .calibration.statistics import Grid
        from .selection import DEFAULT_MODE

        modes = list(dict.fromkeys(args.modes))
        if args.modes == ["adaptive"]:  # --adaptive alone: both modes
            modes = [DEFAULT_MODE, "adaptive"]
        try:
            grid = Grid.defaults(modes, args.block_size)
        except ValueError as e:
            raise CLIError(str(e)) from None
    pipe = load_pipeline(args.pipeline, args.adapter, args.device, args.dtype)
    extra = {}
    if args.guidance_scale is not None:
        extra["guidance_scale"] = args.guidance_scale
    t0 = time.perf_counter()
    from .calibration.runners import runner_for, runner_named

    try:
        runner = runner_named(args.adapter) if args.adapter else runner_for(pipe)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    stats, meta = record(
        pipe, args.inputs, args.prompts or None, adapter=runner.adapter, steps=args.steps, calib_steps=args.calib_steps, height=args.height,
        width=args.width, frames=args.frames, block_size=args.block_size, blocks_per_kind=args.blocks_per_kind,
        tokens_per_block=args.tokens_per_block, timestep_buckets=args.timestep_buckets, seed=args.seed,
        progress=not args.no_progress, pipeline_kwargs=extra, grid=grid,
    )
    meta["pipeline"] = args.pipeline
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    per_head = {"auto": "auto", "always": "always", "off": False}[args.per_head]
    profile = fit_profile(stats, budget, cost_model, per_head=per_head, margin=args.margin, metadata=meta)
    profile.save(out)
    if args.save_stats:
        import torch

        torch.save(stats.state_dict(), args.save_stats)
    s = profile.summary()
    _print_held_out(profile)
    print(f"wrote {out}: {s['layers']} layers, {s['dense_layers']} dense, predicted attention cost "
          f"{fmt(s['mean_relative_cost'], True)} of dense, calibrated in {meta['seconds']:.1f} s")
    return 0


def _print_held_out(profile) -> None:
    """The held-out check per layer (predicted vs leave-one-sample-out error), and a warning per layer over budget."""
    checks = profile.calibrated_on.get("held_out") or {}
    bt, bc = profile.budget["target"], profile.budget["context"]
    header = f"{'layer':<36} {'bucket':>6} {'pred_tgt':>8} {'held_tgt':>8} {'pred_ctx':>8} {'held_ctx':>8} {'margin':>6}"
    print(f"held-out check (leave one sample out; budget target {fmt(bt, True)}, context {fmt(bc, True)}):")
    print(header)
    misses = []
    for name, per_bucket in checks.items():
        for bi, c in enumerate(per_bucket):
            if c is None:
                continue
            ht, hc = c.get("held_out_target"), c.get("held_out_context")
            print(f"{name:<36} {bi:>6} {fmt(c.get('predicted_target'), True):>8} {fmt(ht, True):>8} "
                  f"{fmt(c.get('predicted_context'), True):>8} {fmt(hc, True):>8} {c.get('margin', 0):>6.3f}")
            if ht is None:
                misses.append(f"{name}: one sample only, no held-out check (give two or more --inputs)")
            elif ht > bt or hc > bc:
                misses.append(f"{name} bucket {bi}: held-out error {fmt(ht, True)} / {fmt(hc, True)} exceeds the budget")
    for m in dict.fromkeys(misses):
        print(f"isa: warning: {m}", file=sys.stderr)


def _calibrate_epilog() -> str:
    from .calibration.runners import help_text

    return "pipelines (detected from the saved pipeline; --adapter NAME overrides) and what one --inputs sample is for each:\n" + help_text()


register_command("calibrate", _calibrate, help="calibrate ISA ratios on sample videos or images and write a profile",
                 arguments=_calibrate_args, epilog=_calibrate_epilog(),
                 description="Run the pipeline densely on calibration samples, measure ISA's error per layer and head (every "
                             "transformer of the pipeline), and write the cheapest per-layer ratios whose leave-one-sample-out "
                             "error is within the budget.")


# ================================================================================= main
def _global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """``-v`` and ``--debug``, accepted before and after the subcommand (``isa inspect x --debug``)."""
    extra = {"default": argparse.SUPPRESS} if sub else {}  # a subcommand does not reset what came before it
    p.add_argument("-v", "--verbose", action="count", help="more log output (-vv for debug)", **({"default": 0} if not sub else extra))
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors", **({"default": False} if not sub else extra))


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error: ``isa: error: ...`` and exit 2."""

    def error(self, message):
        self.exit(2, f"isa: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="isa", description="ISA (In-context Sparse Attention) for diffusers: calibration and tools.")
    parser.add_argument("--version", action="version", version=f"isa-plugin {__version__}")
    _global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in _COMMANDS.values():
        kw = {}
        if cmd.epilog:  # kept as written; the description is wrapped here since the raw formatter does not
            kw = dict(epilog=cmd.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        description = cmd.description or cmd.help
        if cmd.epilog:
            width = max(40, shutil.get_terminal_size().columns - 2)
            description = "\n\n".join(textwrap.fill(" ".join(par.split()), width) for par in description.split("\n\n"))
        p = sub.add_parser(cmd.name, help=cmd.help, description=description, **kw)
        if cmd.arguments is not None:
            cmd.arguments(p)
        _global_options(p, sub=True)
        p.set_defaults(_run=cmd.run)
    return parser


class _LogHandler(logging.StreamHandler):
    """``isa: message`` on stderr (``isa: warning: message`` from warnings up); remembers warnings shown."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.shown = set()

    def format(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.shown.add(msg)
            return f"isa: warning: {msg}"
        return f"isa: {msg}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``isa``; returns the exit status."""
    import warnings

    _load_extensions()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (one line printed, exit 2), --help and --version
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    root = logging.getLogger()
    handler, old_level = _LogHandler(), root.level
    root.addHandler(handler)
    root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])

    def show_warning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in handler.shown:  # the library logs most warnings it raises: print each once
            handler.shown.add(text)
            print(f"isa: warning: {text}", file=sys.stderr)

    from .layer_setting import ProfileError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            rc = args._run(args)
        return 0 if rc is None else int(rc)
    except (CLIError, ProfileError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if args.debug:
            raise
        print(f"isa: error: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt:
        print("isa: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, KeyError):
        text = str(e.args[0]) if e.args else text
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
