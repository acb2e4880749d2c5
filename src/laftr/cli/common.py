"""What every subcommand module shares: exit codes, the :class:`Subcommand` record, argument types.

A subcommand module imports this module and the library, never :mod:`laftr.cli` itself; the package imports
the subcommand modules (one direction only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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


# --------------------------------------------------------------------------------------------- torchrun
#: The subcommands that run under ``torchrun --nproc-per-node N`` (every rank reads its shard of the data);
#: the others refuse a launch with more than one process (they would race on their output).
TORCHRUN_COMMANDS = frozenset({"summarize", "distance"})


def launched_world() -> tuple[int, int]:
    """``(rank, world size)`` that a launcher (``torchrun``) set in the environment; ``(0, 1)`` without it.

    Raises:
        UsageError: ``RANK`` / ``WORLD_SIZE`` that are not integers, or a rank outside ``0..WORLD_SIZE-1``.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return 0, 1
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "(set by torchrun) must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} (set by torchrun) do not fit: need "
                         "0 <= RANK < WORLD_SIZE")
    return rank, world


def refuse_torchrun(command: str) -> None:
    """Raise :class:`UsageError` when ``laftr COMMAND`` was launched as several processes (torchrun)."""
    if command in TORCHRUN_COMMANDS:
        return
    _, world = launched_world()
    if world > 1:
        raise UsageError(f"laftr {command} does not run as several processes (WORLD_SIZE={world}: launched "
                         f"by torchrun --nproc-per-node {world}?): the {world} copies would each do the "
                         f"whole run and write the same output; run it as one process. Under torchrun only "
                         f"{' and '.join(sorted(TORCHRUN_COMMANDS))} split their data over the processes")


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` of the run; under torchrun (``WORLD_SIZE`` > 1), with the default group set up.

    The group is initialized from the environment torchrun sets (``env://``: ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) with the gloo backend (the command line runs the network on
    the CPU) and destroyed at the end. A group that is already initialized (``laftr.cli.main`` called from a
    distributed program) is used as it is and left alone. Without a launcher: ``(0, 1)`` and no group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    rank, world = launched_world()
    if world == 1:
        yield 0, 1
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch the processes with "
                         "torchrun --nproc-per-node N -m laftr ...")
    if not dist.is_available():
        raise UsageError("this build of torch has no torch.distributed: run as one process")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def shard(rank: int, world: int, *tensors: Any) -> list[Any]:
    """This rank's contiguous part of each tensor (None stays None).

    Examples ``rank * n // world`` up to ``(rank + 1) * n // world`` of ``n``: the ranks' parts are in order,
    cover every example once and differ in size by at most one (a part may be empty).
    """
    out: list[Any] = []
    for t in tensors:
        if t is None or world == 1:
            out.append(t)
        else:
            n = len(t)
            out.append(t[rank * n // world: (rank + 1) * n // world])
    return out


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
