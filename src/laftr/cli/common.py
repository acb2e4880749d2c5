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

import torch

from .._util import resolve_device
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
def process_group(device: str | None = None) -> Iterator[tuple[int, int, torch.device]]:
    """``(rank, world size, device)`` of the run; under torchrun (``WORLD_SIZE`` > 1), with a process group.

    The device is ``device`` (``--device``; default the CPU). Under torchrun ``cuda`` means the GPU of this
    process's ``LOCAL_RANK`` (one GPU per process, as NCCL needs); naming one GPU (``cuda:0``) for several
    processes is refused. The group is initialized from the environment torchrun sets (``env://``:
    ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) with the NCCL backend on GPUs and gloo on the
    CPU, and destroyed at the end. A group that is already initialized (``laftr.cli.main`` called from a
    distributed program) is used as it is and left alone. Without a launcher: ``(0, 1, device)`` and no group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        yield rank, world, run_device(device, world)
        return
    rank, world = launched_world()
    dev = run_device(device, world)
    if world == 1:
        yield 0, 1, dev
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch the processes with "
                         "torchrun --nproc-per-node N -m laftr ...")
    if not dist.is_available():
        raise UsageError("this build of torch has no torch.distributed: run as one process")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        yield rank, world, dev
    finally:
        dist.destroy_process_group()


def run_device(name: str | None, world: int) -> torch.device:
    """The device of this process for ``--device name`` (default the CPU) in a run of ``world`` processes.

    On a GPU the device is also made CUDA's current device (NCCL's collectives run there). Under torchrun,
    ``cuda`` without an index is the GPU of the process's ``LOCAL_RANK``.

    Raises:
        UsageError: an unknown device, CUDA where there is none, one GPU named for several processes, or more
            processes on this machine than it has GPUs.
    """
    dev = resolve_device("cpu" if name is None else name, "--device")
    assert dev is not None
    if dev.type != "cuda":
        return dev
    if world > 1:
        if dev.index is not None:
            raise UsageError(f"--device {name} names one GPU for all {world} processes; pass --device cuda "
                             "(each process then takes the GPU of its LOCAL_RANK)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s): start at most that many processes per machine with --device cuda")
        dev = torch.device("cuda", local)
    elif dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return dev


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


def thread_count(text: str) -> int:
    """An ``argparse`` type: torch threads, 1 up to 4 per CPU of this machine (100,000 crashed torch)."""
    value = positive_int(text)
    most = 4 * (os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"{value} threads on a machine of {os.cpu_count()} CPUs; give at "
                                         f"most {most}")
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
