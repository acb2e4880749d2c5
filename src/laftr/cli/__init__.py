"""The ``laftr`` command line: one module per subcommand group, one error guard in :func:`main`.

Subcommands: ``demo``, ``info`` (:mod:`.demo`, :mod:`.info`), ``summarize`` and ``distance``
(:mod:`.summarize`), ``fsd-bench`` (:mod:`.fsd_bench`), ``continual`` (:mod:`.continual`), ``influence`` and
``mislabeled`` (:mod:`.influence`). Each module lists its :class:`~laftr.cli.common.Subcommand` records in
``COMMANDS`` and imports only :mod:`.common`, :mod:`.loading` and the library; this package imports the
modules (the library never imports :mod:`laftr.cli`). A run raises :class:`laftr.LaftrError` for a user
mistake and returns its exit code otherwise; :func:`main` turns errors into exit codes:

=====================================================================  ====  ==========================
what happened                                                          exit  stderr
=====================================================================  ====  ==========================
success                                                                0
bad arguments (argparse: unknown option, bad value, ``--limit -5``)     2     usage + ``error: ...``
a :class:`~laftr.LaftrError`: bad option, unusable data, unreadable or   2     ``laftr CMD: error: ...``
refused input file (a pickle without ``--trust-pickle``), missing data
files (:class:`~laftr.DatasetNotFoundError`)
an output path in the way (:class:`~laftr.OutputPathError`,              1     ``laftr CMD: error: ...``
:class:`~laftr.OutDirError`): existing file, non-empty folder
Ctrl-C                                                                 130   ``laftr CMD: interrupted``
any other exception (a bug, out of memory): an internal error          1     the full traceback
=====================================================================  ====  ==========================

Under ``torchrun --nproc-per-node N -m laftr ...`` (``WORLD_SIZE`` > 1 in the environment) ``summarize`` and
``distance`` split the data over the processes (:func:`~laftr.cli.common.process_group`): rank 0 alone writes
and prints, every rank reports its errors and exits with the usual code; every other subcommand refuses to
run (exit 2) rather than run N copies that race on the same output.

To add a subcommand, write ``add_arguments(parser)`` and ``run(args) -> int`` and call
:func:`register_subcommand` before :func:`main` builds the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ..errors import LaftrError, OutputPathError
from . import continual, demo, fsd_bench, influence, info, summarize
from .common import (
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AddArgs,
    Run,
    Subcommand,
    refuse_torchrun,
)

#: name -> (help text, add_arguments, run), in the order ``laftr --help`` lists them.
SUBCOMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}

#: Errors that are the user's to fix (missing data files included): one line, without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (LaftrError,)
#: Of those, the ones that mean "the output path is in the way": exit 1, as always (the rest exit 2).
OUTPUT_ERRORS: tuple[type[BaseException], ...] = (OutputPathError,)


def register_subcommand(name: str, help: str, add_arguments: AddArgs, run: Run) -> None:
    """Make ``laftr NAME`` available: ``add_arguments(subparser)`` then ``run(args) -> exit code``.

    ``run`` raises :class:`laftr.LaftrError` for a user mistake; :func:`main` reports it without a traceback.
    """
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = (help, add_arguments, run)


for _module in (demo, info, summarize, fsd_bench, continual, influence):
    for _cmd in _module.COMMANDS:
        register_subcommand(_cmd.name, _cmd.help, _cmd.add_arguments, _cmd.run)


def build_parser() -> argparse.ArgumentParser:
    """The ``laftr`` argument parser, with one subparser per registered subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="laftr",
        description="Function space distance from a compact summary of the training data (LAFTR).",
        epilog="Exit codes: 0 success; 2 bad arguments, data or input files; 1 output path in the way, or an "
               "internal error (with traceback); 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"laftr {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def exit_code(error: BaseException) -> int:
    """The exit code :func:`main` gives for ``error`` (see the table in this module's docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, OUTPUT_ERRORS):
        return EXIT_FAIL
    if isinstance(error, USER_ERRORS):
        return EXIT_USAGE
    return EXIT_FAIL


#: errors that the disk or its permissions cause, not laftr (a full disk, a read-only folder)
_DISK_FAILURES = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``laftr`` console script; returns the exit code.

    Argument errors exit through argparse (``SystemExit(2)`` with the usage); everything a subcommand raises
    goes through the one guard here (see the module docstring for the table).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser, with its usage (argparse's top-level one shows laftr's)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    prog = f"laftr {args.command}"
    try:
        refuse_torchrun(args.command)
        return int(args._run(args))
    except KeyboardInterrupt:
        resume = ""
        if args.command == "continual" and getattr(args, "out", None):
            out = Path(args.out)
            staging = out.parent / f".{out.name}.partial"
            if staging.is_dir() and any(staging.iterdir()):
                resume = f"; the finished runs are kept in {staging}: the command with --resume continues"
        print(f"\n{prog}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except FloatingPointError as e:  # training diverged (the loss became nan): the settings, not a bug
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the output went to a pipe that closed (laftr info FILE | head -1)
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (interpreter exit flushes stdout into it)
        return EXIT_OK
    except OSError as e:
        if e.errno not in _DISK_FAILURES:
            return _internal_error(prog)
        # (a disk that filled, or a folder made read-only, during the run: no bug of laftr's)
        print(f"{prog}: error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return EXIT_FAIL
    except Exception:  # noqa: BLE001 - a bug or a resource failure: keep everything needed to find it
        return _internal_error(prog)


def _internal_error(prog: str) -> int:
    """The traceback of the exception being handled, and a line that says what it is; the exit code."""
    traceback.print_exc(file=sys.stderr)
    print(f"{prog}: internal error "
          "(the traceback above; please report it if it is not an out-of-memory or disk problem)",
          file=sys.stderr)
    return EXIT_FAIL


__all__ = [
    "EXIT_FAIL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "OUTPUT_ERRORS",
    "SUBCOMMANDS",
    "USER_ERRORS",
    "Subcommand",
    "build_parser",
    "exit_code",
    "main",
    "register_subcommand",
]
