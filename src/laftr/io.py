"""Saving and loading fitted estimators: safetensors tensors plus JSON metadata with a format version.

A summary file is a safetensors file whose ``__metadata__`` holds one entry, ``laftr``: a JSON object with the
format tag, the format version, the estimator's name, config, outputs, architecture and extra state. Since
format version 3 it also records, for every stored tensor, its dtype, shape and the SHA-256 of its dtype,
shape and raw bytes (``tensors``), and the SHA-256 of the canonical JSON of all other metadata
(``metadata_sha256``), so that :func:`load` notices any change made to the file after it was written: a
flipped bit in a tensor, an edited number in the header. Format version 4 adds ``buffers``: which entries of
the architecture are buffers rather than parameters. Whatever is wrong with a file, :func:`load` raises
:class:`SummaryFileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ._util import atomic_write_bytes, is_integer, resolve_device
from .errors import DataError, OptionError, OutputExistsError, OutputIsDirectoryError, SummaryFileError
from .estimators.base import REGISTRY, FSDEstimator

FORMAT = "laftr-summary"
#: 3: content hashes of every tensor and of the metadata (laftr 0.3); 2: LAFTR summaries keep named statistics
#: per site and one input model (laftr 0.2); 1 and 2 are still read.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

#: The metadata keys of each format version (anything else in a file is refused).
_KEYS_V2 = frozenset({"format", "format_version", "estimator", "config", "outputs", "arch", "extra"})
_KEYS_V3 = _KEYS_V2 | {"graph_fingerprint", "tensors", "metadata_sha256"}
#: Version 4 adds which entries of ``arch`` are buffers (not parameters), so that a loaded estimator refuses
#: them where only parameters make sense (``damped_solve``).
_KEYS_V4 = _KEYS_V3 | {"buffers"}
_KEYS = {1: _KEYS_V2, 2: _KEYS_V2, 3: _KEYS_V3, 4: _KEYS_V4}
#: safetensors refuses headers larger than this; so do we, before reading one.
_MAX_HEADER = 100_000_000
_PREFIXES = ("theta0/", "state/")

__all__ = ["FORMAT", "FORMAT_VERSION", "SummaryFileError", "atomic_write_bytes", "from_bytes", "load", "save",
           "to_bytes"]


# ---------------------------------------------------------------------------------------------- writing files
def is_laftr_summary(path: Path) -> bool:
    """Whether ``path`` is a regular file whose safetensors header carries laftr metadata.

    Only the header is read, with the checks :func:`_parse` applies to it; the file may otherwise be damaged.
    """
    try:
        if not path.is_file():
            return False
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) == 8 and n <= min(size - 8, _MAX_HEADER):
                head += f.read(n)
        _laftr_meta(head, size, str(path))
        return True
    except (OSError, SummaryFileError):
        return False  # anything unreadable is, for this question, simply not a summary


def _check_target(path: Path, overwrite: bool | None) -> None:
    if overwrite is not None and not isinstance(overwrite, bool):
        raise OptionError(f"overwrite must be None, True or False, got {overwrite!r}")
    if path.is_dir():
        raise OutputIsDirectoryError(f"{path} is a directory; give the path of a summary file")
    if not os.path.lexists(path) or overwrite is True:
        return
    if overwrite is False:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not is_laftr_summary(path):
        raise OutputExistsError(
            f"{path} exists and is not a laftr summary; pass overwrite=True to replace it anyway"
        )


# ---------------------------------------------------------------------------------------------- hashes
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw (native, little-endian on every supported machine) bytes."""
    h = hashlib.sha256(f"{_dtype_name(t)};{list(t.shape)};".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metadata_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of every metadata entry but the hash itself."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _has_inf(t: torch.Tensor) -> bool:
    return bool((t.is_floating_point() or t.is_complex()) and torch.isinf(t).any())


def _has_nan(t: torch.Tensor) -> bool:
    return bool((t.is_floating_point() or t.is_complex()) and torch.isnan(t).any())


# ---------------------------------------------------------------------------------------------- save
def save(estimator: FSDEstimator, path: str | os.PathLike[str], overwrite: bool | None = None) -> Path:
    """Save a fitted estimator (its summary and theta0) to ``path`` as a safetensors file (format version 4).

    Args:
        estimator: a fitted estimator.
        path: destination file (conventionally ``*.laftr``).
        overwrite: ``None`` (default): replace an existing file only if it is a laftr summary itself;
            ``True``: replace any existing file; ``False``: never replace an existing file.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        laftr.errors.OutputExistsError: ``path`` exists and ``overwrite`` does not allow replacing it (a
            ``FileExistsError``).
        laftr.errors.OutputIsDirectoryError: ``path`` is a directory, whatever ``overwrite`` says (an
            ``IsADirectoryError``).
        DataError: a stored statistic is not finite, or theta0 holds NaN (such a file could not be loaded).
    """
    _check_saveable(estimator)
    path = Path(path)
    _check_target(path, overwrite)
    atomic_write_bytes(path, to_bytes(estimator))
    return path


def _check_saveable(estimator: Any) -> None:
    """Refuse what is not a fitted estimator (before :func:`save` looks at its target)."""
    if not isinstance(estimator, FSDEstimator):
        raise TypeError(f"can only save FSDEstimator objects, got {type(estimator).__name__}")
    if not estimator.fitted:
        raise RuntimeError("cannot save an estimator that has not been fitted")


def to_bytes(estimator: FSDEstimator) -> bytes:
    """The bytes of :func:`save`'s file for a fitted ``estimator`` (:func:`from_bytes` reads them back)."""
    from safetensors.torch import save as st_save

    _check_saveable(estimator)
    fingerprint = getattr(estimator, "graph_fingerprint", None)
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise TypeError(f"graph_fingerprint must be a str or None, got {type(fingerprint).__name__}")
    tensors, extra = estimator._state()
    out: dict[str, torch.Tensor] = {}
    for k, v in (estimator.theta0 or {}).items():
        out[f"theta0/{k}"] = v.detach().cpu().contiguous()
    for k, v in tensors.items():
        out[f"state/{k}"] = v.detach().cpu().contiguous()
    records: dict[str, dict[str, Any]] = {}
    for k, v in out.items():
        if _has_nan(v) or (k.startswith("state/") and _has_inf(v)):
            raise DataError(f"cannot save {estimator.name!r}: stored tensor {k!r} contains "
                            "NaN or infinite values")
        records[k] = {"dtype": _dtype_name(v), "shape": list(v.shape), "sha256": _tensor_sha256(v)}
        if _has_inf(v):  # e.g. an attention mask buffer of -inf: allowed in theta0, and recorded
            records[k]["infinite"] = True
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": estimator.name,
        "config": dataclasses.asdict(estimator.config),
        "outputs": estimator.outputs,
        "arch": estimator.arch,
        "extra": extra,
        "graph_fingerprint": fingerprint,
        "buffers": None if estimator._buffer_names is None else sorted(estimator._buffer_names),
    }
    # hash exactly what a reader will parse (tuples -> lists, int keys -> str)
    meta = json.loads(json.dumps(meta))
    meta["tensors"] = records
    meta["metadata_sha256"] = _metadata_sha256(meta)
    return st_save(out, metadata={"laftr": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------- load
def load(path: str | os.PathLike[str], device: str | torch.device | None = None) -> FSDEstimator:
    """Load an estimator saved by :func:`save`.

    Every stored tensor and the metadata are checked against the SHA-256 hashes recorded at save (formats 3
    and 4), against the dtypes and shapes the metadata records, and for NaN / infinite values; files of
    formats 1 and 2 (no hashes) get every check but the hashes.

    Args:
        path: a summary file.
        device: where to put the loaded tensors (default: the CPU).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        SummaryFileError: the file is truncated, corrupted, changed since it was written, of another format or
            version, or otherwise not a readable laftr summary; the message says what is wrong.
        UsageError: ``device`` is not a device this machine has (or is ``meta``).
    """
    # before reading: a bad device is the caller's mistake, not the file's
    dev = resolve_device(device, "device")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no summary file at {path}")
    return _load_bytes(path.read_bytes(), str(path), dev)


def from_bytes(raw: bytes, name: str = "summary bytes", device: str | torch.device | None = None,
               ) -> FSDEstimator:
    """:func:`load` from the bytes of a file (:func:`to_bytes`); ``name`` names them in error messages."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"from_bytes takes bytes, got {type(raw).__name__}")
    return _load_bytes(bytes(raw), name, device)


def _load_bytes(raw: bytes, name: str, device: str | torch.device | None = None) -> FSDEstimator:
    """:func:`load` from the bytes of a file; ``name`` names it in error messages."""
    dev = resolve_device(device, "device")
    tensors, meta = _parse(raw, name)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise SummaryFileError(
            f"{name} has summary format version {version!r}, this laftr reads versions "
            f"{list(READABLE_VERSIONS)}"
        )
    keys = _KEYS[version]
    unknown = sorted(set(meta) - keys)
    if unknown:
        raise SummaryFileError(f"{name}: unknown metadata entries {unknown} for format version {version}")
    if version >= 3:
        _verify_hashes(tensors, meta, name)
    _check_tensors(tensors, meta, version, name)
    est = _build(meta, version, name)
    theta0: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("theta0/"):
            theta0[k[len("theta0/") :]] = v
        else:
            state[k[len("state/") :]] = v
    arch = est.arch or []
    if sorted(theta0) != sorted(n for n, _ in arch):
        raise SummaryFileError(f"{name}: stored parameters do not match the stored architecture")
    for n, shape in arch:
        if list(theta0[n].shape) != list(shape):
            raise SummaryFileError(f"{name}: parameter {n!r} has shape "
                                   f"{list(theta0[n].shape)}, header says {shape}")
    if dev is not None:
        theta0 = {k: v.to(dev) for k, v in theta0.items()}
        state = {k: v.to(dev) for k, v in state.items()}
    est.theta0 = theta0
    extra = meta.get("extra")
    try:
        est._load_state(state, {} if extra is None else extra)
    except MemoryError:
        raise
    except Exception as e:  # garbage in a file must not surface as a TypeError / IndexError / ...
        raise SummaryFileError(f"{name}: summary contents are inconsistent: {type(e).__name__}: {e}") from e
    return est


def _laftr_meta(head: bytes, size: int, name: str) -> dict[str, Any]:
    """The laftr metadata from the start of a file of ``size`` bytes.

    ``head`` holds at least its length field and header. Raises :class:`SummaryFileError` saying why there is
    none.
    """
    if head[:4] == b"PK\x03\x04":  # what torch.save writes (a zip archive): weights or tensors, not a summary
        raise SummaryFileError(f"{name} is a torch.save file (a zip archive: weights or tensors?), not a "
                               "laftr summary; summaries are written by `laftr summarize` or laftr.save")
    unreadable = f"{name} is not a readable laftr summary (truncated or corrupted?)"
    if size < 8:
        raise SummaryFileError(f"{unreadable}: only {size} bytes")
    n = int.from_bytes(head[:8], "little")
    if n > min(size - 8, _MAX_HEADER):
        raise SummaryFileError(f"{unreadable}: its header length field says {n:,} bytes, "
                               f"the file has {size:,}")
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
    except MemoryError:
        raise
    except Exception as e:
        raise SummaryFileError(f"{unreadable}: its header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise SummaryFileError(f"{unreadable}: its header is not a JSON object")
    st_meta = header.get("__metadata__")
    meta_s = st_meta.get("laftr") if isinstance(st_meta, dict) else None
    if not isinstance(meta_s, str):
        raise SummaryFileError(f"{name} is a safetensors file but not a laftr summary (no laftr metadata)")
    try:
        meta = json.loads(meta_s)
    except MemoryError:
        raise
    except Exception as e:
        raise SummaryFileError(f"{unreadable}: its laftr metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SummaryFileError(f"{name} is a safetensors file but not a laftr summary (no laftr metadata)")
    return meta


def _parse(raw: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the laftr metadata of a file, or :class:`SummaryFileError`."""
    from safetensors.torch import load as st_load

    meta = _laftr_meta(raw, len(raw), name)
    unreadable = f"{name} is not a readable laftr summary (truncated or corrupted?)"
    try:
        tensors = st_load(raw)
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, but also others on odd headers
        raise SummaryFileError(f"{unreadable}: {type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict):  # pragma: no cover - safetensors' contract
        raise SummaryFileError(f"{unreadable}: no tensors")
    return tensors, meta


def _verify_hashes(tensors: dict[str, torch.Tensor], meta: dict[str, Any], name: str) -> None:
    """Format 3: the metadata hash, then each tensor's recorded dtype, shape and hash."""
    records, digest = meta.get("tensors"), meta.get("metadata_sha256")
    if not isinstance(records, dict) or not isinstance(digest, str):
        raise SummaryFileError(f"{name}: a format-3 summary without its content hashes "
                               "(damaged or forged file)")
    if digest != _metadata_sha256(meta):
        raise SummaryFileError(f"{name}: the metadata does not match its recorded SHA-256 hash (the file was "
                               "changed after it was written)")
    missing = sorted(set(records) - set(tensors))
    if missing:
        raise SummaryFileError(f"{name}: tensor {missing[0]!r} is recorded in the metadata but "
                               "missing from the file")
    extra = sorted(set(tensors) - set(records))
    if extra:
        raise SummaryFileError(f"{name}: tensor {extra[0]!r} is in the file but has no recorded hash")
    for k in sorted(tensors):
        rec, t = records[k], tensors[k]
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
            raise SummaryFileError(f"{name}: the record of tensor {k!r} is malformed")
        if rec.get("dtype") != _dtype_name(t):
            raise SummaryFileError(f"{name}: tensor {k!r} has dtype {_dtype_name(t)}, the metadata records "
                                   f"{rec.get('dtype')!r}")
        if rec.get("shape") != list(t.shape):
            raise SummaryFileError(f"{name}: tensor {k!r} has shape {list(t.shape)}, the metadata records "
                                   f"{rec.get('shape')!r}")
        if rec["sha256"] != _tensor_sha256(t):
            raise SummaryFileError(f"{name}: tensor {k!r} does not match its recorded SHA-256 hash "
                                   "(the file was changed after it was written)")


def _check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], version: int, name: str) -> None:
    """Check the names and the finiteness of the stored tensors.

    No NaN anywhere; infinities only in theta0 entries that may hold them (formats 3, 4: recorded at save;
    formats 1 and 2: additive masks, whose finite entries are all zero).
    """
    records = meta.get("tensors") if version >= 3 else None
    for k, t in tensors.items():
        if not k.startswith(_PREFIXES) or k in _PREFIXES:
            raise SummaryFileError(f"{name}: unexpected tensor {k!r} "
                                   "(laftr stores only theta0/... and state/...)")
        if _has_nan(t):
            raise SummaryFileError(f"{name}: tensor {k!r} contains NaN values")
        if _has_inf(t):
            if k.startswith("theta0/"):
                if records is not None:
                    allowed = records[k].get("infinite") is True
                else:
                    allowed = bool((t[torch.isfinite(t)] == 0).all())
                if allowed:
                    continue
            raise SummaryFileError(f"{name}: tensor {k!r} contains infinite values")


def _is_int(v: Any, minimum: int = 0) -> bool:
    return is_integer(v) and int(v) >= minimum


def _build(meta: dict[str, Any], version: int, name: str) -> FSDEstimator:
    """The estimator (config, outputs, arch, graph fingerprint) described by checked metadata."""
    est_name = meta.get("estimator")
    if not isinstance(est_name, str) or est_name not in REGISTRY:
        raise SummaryFileError(f"{name} holds an estimator {est_name!r} that this laftr does not know")
    cls = REGISTRY[est_name]
    options = meta.get("config")
    if options is None and version < 3:
        options = {}
    if not isinstance(options, dict):
        raise SummaryFileError(f"{name}: the config is not a JSON object")
    if version == 1:  # laftr 0.1 gave laftr and laftr-exact one config; drop the options the other one had
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        options = {k: v for k, v in options.items() if k in fields}
    try:
        config = cls.Config(**options)
        est = cls(config)
    except MemoryError:
        raise
    except Exception as e:
        raise SummaryFileError(f"{name}: config does not match estimator {est_name!r}: {e}") from e
    outputs = meta.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and outputs
                                    and all(_is_int(o) for o in outputs)):
        raise SummaryFileError(f"{name}: outputs must be null or a non-empty list of output "
                               f"indices, got {outputs!r}")
    arch = meta.get("arch")
    if not isinstance(arch, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
        and all(_is_int(s) for s in e[1]) for e in arch
    ):
        raise SummaryFileError(f"{name}: the stored architecture is malformed")
    if len({e[0] for e in arch}) != len(arch):
        raise SummaryFileError(f"{name}: the stored architecture names a parameter twice")
    extra = meta.get("extra")
    if not (isinstance(extra, dict) or (extra is None and version < 3)):
        raise SummaryFileError(f"{name}: the estimator state in the metadata is not a JSON object")
    fingerprint = meta.get("graph_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise SummaryFileError(f"{name}: graph_fingerprint must be a string or null")
    buffers = meta.get("buffers")
    if buffers is not None and not (isinstance(buffers, list) and all(isinstance(b, str) for b in buffers)):
        raise SummaryFileError(f"{name}: buffers must be null or a list of names, got {buffers!r}")
    if buffers is not None and not set(buffers) <= {e[0] for e in arch}:
        unknown_buffers = sorted(set(buffers) - {e[0] for e in arch})
        raise SummaryFileError(f"{name}: buffers {unknown_buffers} are not in the stored architecture")
    est.outputs = None if outputs is None else [int(o) for o in outputs]
    est.arch = arch
    est.graph_fingerprint = fingerprint
    est._buffer_names = None if buffers is None else frozenset(buffers)
    return est
