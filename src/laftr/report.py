"""Small helpers for experiment outputs: atomic JSON, markdown tables, run metadata, output folders."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class OutDirError(RuntimeError):
    """The output folder exists and is not empty (and overwriting was not asked for)."""


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
    """Write ``obj`` as indented JSON to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
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

    Raises:
        OutDirError: ``path`` is a non-empty folder and ``force`` is False, or ``path`` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutDirError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise OutDirError(
                f"output folder {path} exists and is not empty; choose another --out or pass --force "
                "to overwrite its files"
            )
        log.warning("writing into non-empty folder %s (force)", path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
