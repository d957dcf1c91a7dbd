"""The ``isa`` command line (also ``python -m isa_plugin``): a thin shell over the library.

This module is the command framework; the commands live in the modules of :data:`EXTENSION_MODULES`
(``calibrate``, ``edit``, ``inspect``, ``validate``, ``demo``, ``eval``, ``convert-liveditor``), and the
pipeline loading they share in :mod:`isa_plugin.pipeline_loading`. Adding a command is a few lines::

    # isa_plugin/demo_cli.py
    from isa_plugin.cli import command

    @command("demo", help="run a pipeline with and without ISA", arguments=lambda p: p.add_argument("--pipeline"))
    def demo(args):
        ...                      # raise CLIError("...") (or ValueError) for a user error: one line, exit 2
        return 0

and list the module in :data:`EXTENSION_MODULES` (or expose it through the ``isa_plugin.cli`` entry-point
group of another package). A command module imports nothing heavy at import time: ``isa --help`` imports
every one of them and starts without torch. User errors (bad arguments, missing or corrupt files, profiles
that do not fit the model) print one line ``isa: error: ...`` and exit non-zero without a traceback;
``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["main", "command", "register_command", "CLIError", "EXTENSION_MODULES", "budget_arg", "build_parser"]

logger = logging.getLogger("isa_plugin.cli")

#: modules imported by :func:`main` so their ``@command`` registrations take effect (missing ones are skipped);
#: commands are listed by ``isa --help`` in this order
EXTENSION_MODULES: List[str] = ["isa_plugin.calibrate_cli", "isa_plugin.edit_cli", "isa_plugin.profile_cli", "isa_plugin.demo_cli",
                                "isa_plugin.eval_cli", "isa_plugin.liveditor_cli"]


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

    The value goes through :func:`isa_plugin.validation.validate_budget`, so ``--budget 2`` or ``--budget 0``
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


def fmt_ratio(v) -> str:
    if isinstance(v, tuple):
        return f"{sum(v) / len(v):.3g}*"
    return f"{v:.4g}"


def fmt(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


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


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``isa`` parser: global options and one subparser per registered command.

    Args:
        commands: the commands whose options are declared (None: every command). Every command is listed
            by ``isa --help`` either way; :func:`main` declares only the command on its command line, so
            that ``isa --help`` runs no command's ``arguments`` (some import torch, e.g. to list the
            registered selection modes).

    Returns:
        the parser; ``parse_args`` sets ``args._run`` to the chosen command's function.

    Example:
        >>> build_parser(["inspect"]).parse_args(["inspect", "profile.yaml"]).profile
        'profile.yaml'
    """
    from . import __version__

    parser = _Parser(prog="isa", description="ISA (In-context Sparse Attention) for diffusers: calibration and tools.")
    parser.add_argument("--version", action="version", version=f"isa-plugin {__version__}")
    _global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in _COMMANDS.values():
        if commands is not None and cmd.name not in commands:
            sub.add_parser(cmd.name, help=cmd.help)  # listed only: never parsed in this run
            continue
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


def _command_in(argv: Sequence[str]) -> List[str]:
    """The registered command named on a command line (its first word that is not an option), as a list."""
    for word in argv:
        if not word.startswith("-"):  # the global options take no value
            return [word] if word in _COMMANDS else []
    return []


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
    parser = build_parser(_command_in(sys.argv[1:] if argv is None else argv))
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
