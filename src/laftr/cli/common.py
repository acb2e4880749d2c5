"""What every subcommand module shares: exit codes, the :class:`Subcommand` record, argument types.

A subcommand module imports this module and the library, never :mod:`laftr.cli` itself; the package imports
the subcommand modules (one direction only).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import LaftrError, UsageError

EXIT_OK = 0
EXIT_FAIL = 1  # an internal error (traceback printed), or an output path that is in the way
EXIT_USAGE = 2  # bad arguments or options, unusable data, unreadable or refused input files
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Subcommand:
    """One ``laftr NAME`` command.

    Attributes:
        name: The command's name on the command line.
        help: One line for ``laftr --help`` (also the subcommand's description).
        add_arguments: Declares the options on the subcommand's parser.
        run: Executes the parsed arguments and returns the exit code; a user mistake is raised as a
            :class:`laftr.LaftrError`, which :func:`laftr.cli.main` reports without a traceback.
    """

    name: str
    help: str
    add_arguments: AddArgs
    run: Run


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``laftr fsd-bench --quick ...``), for the metadata of result files."""
    argv = getattr(args, "argv", None)
    return "laftr " + " ".join(argv if argv else [args.command])


@contextlib.contextmanager
def user_options(what: str | None = None) -> Iterator[None]:
    """Report a ``ValueError`` raised while a config is built from the user's options as a usage error.

    The :class:`laftr.UsageError` exits with status 2 and no traceback.

    Wrap only the construction and validation of a config from command-line values, never a whole run: there
    any ``ValueError`` is a bad option, while elsewhere it may be a bug whose traceback is needed.
    """
    try:
        yield
    except LaftrError:
        raise
    except ValueError as e:
        raise UsageError(f"{what}: {e}" if what else str(e)) from e


# --------------------------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--limit 0`` and ``--limit -5`` are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def csv_list(text: str) -> list[str]:
    """An ``argparse`` type: ``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def spec_list(text: str) -> list[str]:
    """An ``argparse`` type: comma-separated specs, commas inside brackets kept (``laftr[a=1,b=2],kfac``)."""
    from ..specs import split_specs

    try:
        return split_specs(text, what="--methods")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_list(text: str) -> list[int]:
    """An ``argparse`` type: comma-separated integers, at least one, e.g. ``0,1,2``."""
    try:
        out = [int(t) for t in csv_list(text)]
    except ValueError:
        out = []
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return out


def positive_int_list(text: str) -> list[int]:
    """An ``argparse`` type: comma-separated integers >= 1, at least one (e.g. hidden widths ``50,50``)."""
    out = int_list(text)
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return out
