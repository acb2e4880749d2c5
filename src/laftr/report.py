"""Result files of experiments: atomic JSON, markdown tables, run metadata (provenance), output folders.

Every experiment of laftr (and every script in ``benchmarks/``) writes its results with these: a run folder
written into a staging folder and moved into place when complete (:class:`RunFolder`), ``results.json``
written atomically (:func:`write_json_atomic`) with the run's provenance (:func:`run_metadata`: command, seed,
git revision, device, versions), and markdown tables (:func:`markdown_table`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._util import atomic_write_bytes, unwritable
from .errors import OutDirError as OutDirError  # defined in laftr.errors; still importable from here

__all__ = ["RunFolder", "git_revision", "markdown_table", "prepare_out_dir", "pyplot", "run_metadata",
           "write_json_atomic"]

log = logging.getLogger(__name__)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    It goes to a temporary file in the same folder first, then ``os.replace``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _fmt(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v).replace("|", "\\|")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g"
) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts); ``columns`` picks and orders the keys.

    Missing values are left blank; floats are formatted with ``floatfmt``.
    """
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    columns = list(columns)
    cells = [[_fmt(r.get(c), floatfmt) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def git_revision(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """``git rev-parse HEAD`` of the folder holding this package (or ``cwd``), None if unavailable."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def run_metadata(
    command: str, seed: int | None = None, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Provenance of a run: command, seed, git revision, device, versions, platform (no hostname), time."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from . import __version__

    return {
        "command": command,
        "seed": seed,
        "git_revision": git_revision(),
        "laftr_version": __version__,
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


def prepare_out_dir(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Create the output folder ``path``; refuse to reuse a non-empty existing one unless ``force``.

    Prefer :class:`RunFolder` for a run's results: it never leaves a half-written run beside a finished one.

    Raises:
        OutDirError: ``path`` is a non-empty folder and ``force`` is False, or ``path`` is a file.
    """
    path = Path(path)
    _check_target(path, force)
    if path.is_dir() and any(path.iterdir()):
        log.warning("writing into non-empty folder %s (force)", path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_target(path: Path, force: bool, resume: bool = False) -> None:
    parent = next((q for q in path.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutDirError(f"cannot write {path}: {parent} is a file, not a folder; choose another --out")
    why = None if parent is None else unwritable(parent)
    if why is not None:
        raise OutDirError(f"cannot write {path}: no file can be created in {parent} ({why}); choose another "
                          "--out")
    if path.exists() and not path.is_dir():
        raise OutDirError(f"output path {path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (force or resume):
        raise OutDirError(
            f"output folder {path} exists and is not empty; choose another --out or pass "
            "--force to replace it"
        )


def _check_replaceable(path: Path) -> None:
    """Refuse an output folder that a finished run may not replace.

    The working folder (or one holding it), and a non-empty folder that holds no laftr run (its
    ``results.json``), whose files a ``--force`` would delete.
    """
    where = path.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise OutDirError(f"--out {path} is the working folder or holds it; a run replaces its whole output "
                          "folder when it finishes: name a new folder, e.g. --out runs/first")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if names and "results.json" not in names:
        raise OutDirError(f"output folder {path} holds files that are not a laftr run ({', '.join(names[:5])}"
                          f"{', ...' if len(names) > 5 else ''}); --force replaces a previous run's folder, "
                          "never other files: choose another --out")


class RunFolder:
    """The output folder of one run, written so that runs can never mix.

    The run writes into a staging folder beside ``path`` (``.NAME.partial``); :meth:`commit` moves it into
    place when the run is complete, replacing an earlier run at ``path`` only when ``force`` (or ``resume``)
    was given. A run that fails or is interrupted leaves ``path`` as it was (the earlier run, or nothing) and
    its partial results in the staging folder, which a ``resume`` continues from and ``force`` discards.

    Usage::

        run = RunFolder(out_dir, force=force)   # checks the target before any work
        out = run.open()                         # the staging folder: write everything here
        ...
        run.commit()                             # promote to out_dir
    """

    def __init__(self, path: str | os.PathLike[str], force: bool = False, resume: bool | None = None) -> None:
        """Check the target ``path`` and any unfinished run of it before any work is done.

        ``resume``: continue an unfinished run (True), or not (False); ``None`` (default): the command cannot
        resume a run, so the message about an unfinished one offers ``--force`` alone.
        """
        self.path = Path(path)
        self.force, self.resume = force, bool(resume)
        self.staging = self.path.parent / f".{self.path.name}.partial"
        _check_target(self.path, force, self.resume)
        _check_replaceable(self.path)
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()  # a run that failed before writing anything: nothing to keep or resume
        if self.staging.exists() and not (force or resume):
            how = " or --resume to continue it" if resume is not None else ""
            raise OutDirError(f"an unfinished run of {self.path} is in {self.staging}; pass --force to "
                              f"discard it{how}")

    def open(self) -> Path:
        """Create (or, with ``resume``, reuse) the staging folder and return it."""
        if self.staging.exists() and not self.resume:
            shutil.rmtree(self.staging)
        if self.resume and not self.staging.exists() and self.path.is_dir():
            # continue a run that an earlier laftr wrote in place: work on a copy, the original stays
            shutil.copytree(self.path, self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def commit(self) -> Path:
        """Move the finished run into place and return its path.

        The earlier run at ``path``, if any, is removed.
        """
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / self.path.name)
        os.replace(self.staging, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path


def pyplot() -> Any:  # a module: its functions are typed by matplotlib, not through this return
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
