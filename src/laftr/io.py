"""Saving and loading fitted estimators: safetensors tensors plus JSON metadata with a format version."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import SummaryFileError
from .estimators.base import REGISTRY, FSDEstimator

FORMAT = "laftr-summary"
#: 2: LAFTR summaries keep named statistics per site and one input model (laftr 0.2); 1 is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

__all__ = ["FORMAT", "FORMAT_VERSION", "SummaryFileError", "atomic_write_bytes", "load", "save"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(estimator: FSDEstimator, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Save a fitted estimator (its summary and theta0) to ``path`` as a safetensors file.

    Args:
        estimator: a fitted estimator.
        path: destination file (conventionally ``*.laftr``).
        overwrite: when False, refuse to replace an existing file.
    """
    from safetensors.torch import save as st_save

    if not isinstance(estimator, FSDEstimator):
        raise TypeError(f"can only save FSDEstimator objects, got {type(estimator).__name__}")
    if not estimator.fitted:
        raise RuntimeError("cannot save an estimator that has not been fitted")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors, extra = estimator._state()
    out: dict[str, torch.Tensor] = {}
    for k, v in (estimator.theta0 or {}).items():
        out[f"theta0/{k}"] = v.detach().cpu().contiguous()
    for k, v in tensors.items():
        out[f"state/{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": estimator.name,
        "config": dataclasses.asdict(estimator.config),
        "outputs": estimator.outputs,
        "arch": estimator.arch,
        "extra": extra,
    }
    blob = st_save(out, metadata={"laftr": json.dumps(meta)})
    atomic_write_bytes(path, blob)
    return path


def load(path: str | os.PathLike[str], device: str | torch.device | None = None) -> FSDEstimator:
    """Load an estimator saved by :func:`save`; raises :class:`SummaryFileError` on a bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no summary file at {path}")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        # safetensors.torch.load does not expose metadata; parse the header ourselves.
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        meta_s = header.get("__metadata__", {}).get("laftr")
        meta = json.loads(meta_s) if meta_s else None
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError, RuntimeError, OSError) as e:
        raise SummaryFileError(f"{path} is not a readable laftr summary (truncated or corrupted?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SummaryFileError(f"{path} is a safetensors file but not a laftr summary (no laftr metadata)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise SummaryFileError(
            f"{path} has summary format version {version}, this laftr reads versions {list(READABLE_VERSIONS)}"
        )
    name = meta.get("estimator")
    if name not in REGISTRY:
        raise SummaryFileError(f"{path} holds an estimator {name!r} that this laftr does not know")
    cls = REGISTRY[name]
    options = dict(meta.get("config") or {})
    if version == 1:  # laftr 0.1 gave laftr and laftr-exact one config; drop the options the other one had
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        options = {k: v for k, v in options.items() if k in fields}
    try:
        config = cls.Config(**options)
    except (TypeError, ValueError) as e:
        raise SummaryFileError(f"{path}: config does not match estimator {name!r}: {e}") from e
    est = cls(config)
    est.outputs = meta.get("outputs")
    est.arch = meta.get("arch")
    dev = torch.device(device) if device is not None else None
    theta0: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.to(dev) if dev is not None else v
        if k.startswith("theta0/"):
            theta0[k[len("theta0/") :]] = v
        elif k.startswith("state/"):
            state[k[len("state/") :]] = v
    if est.arch is None or sorted(theta0) != sorted(n for n, _ in est.arch):
        raise SummaryFileError(f"{path}: stored parameters do not match the stored architecture")
    for n, shape in est.arch:
        if list(theta0[n].shape) != list(shape):
            raise SummaryFileError(f"{path}: parameter {n!r} has shape {list(theta0[n].shape)}, header says {shape}")
    est.theta0 = theta0
    try:
        est._load_state(state, meta.get("extra", {}))
    except (KeyError, ValueError, RuntimeError) as e:
        raise SummaryFileError(f"{path}: summary contents are inconsistent: {e}") from e
    return est
