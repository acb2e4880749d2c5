"""Reader and writer for the IDX format used by MNIST and Fashion-MNIST (plain or gzip-compressed).

An IDX file starts with a 4-byte magic number: two zero bytes, a type code (``0x08`` unsigned byte,
``0x09`` signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64) and the number
of dimensions. Then come one big-endian uint32 per dimension and the data in C order, big-endian.
MNIST labels are ``0x00000801`` (1-D unsigned bytes), images ``0x00000803`` (3-D unsigned bytes).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    if not _is_gzip(path):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def read_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file into a numpy array.

    Gzip compression is detected from the file's first bytes, not its name.

    Args:
        path: The file to read.
        expect_ndim: If given, the number of dimensions the header must declare (1 for MNIST labels,
            3 for MNIST images).

    Returns:
        A read-only native-endian array with the shape from the header (a zero-copy view for
        unsigned/signed bytes).

    Raises:
        ValueError: The file has a wrong magic number, an unknown type code, an unexpected number of
            dimensions, or its size does not match the header (truncated or with trailing bytes).
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(buf)} bytes)")
    zero1, zero2, code, ndim = buf[0], buf[1], buf[2], buf[3]
    magic = int.from_bytes(buf[:4], "big")
    if zero1 or zero2 or code not in IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x000008NN for unsigned-byte data, "
            "e.g. 0x00000801 for labels or 0x00000803 for images)"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(
            f"{path}: IDX magic 0x{magic:08x} declares {ndim} dimension(s), expected {expect_ndim} "
            f"(magic 0x{(code << 8) | expect_ndim:08x})"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = IDX_DTYPES[code]
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(buf) - header
    if have < need:
        raise ValueError(f"{path}: truncated IDX data: shape {shape} needs {need} bytes, file has {have}")
    if have > need:
        raise ValueError(f"{path}: {have - need} unexpected trailing bytes after IDX data of shape {shape}")
    arr = np.frombuffer(buf, dtype=dtype, count=need // dtype.itemsize, offset=header).reshape(shape)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
        arr.flags.writeable = False
    log.debug("read IDX %s: shape %s dtype %s", path, shape, arr.dtype)
    return arr


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (used for tests and for exporting small data sets).

    Args:
        path: Destination file.
        array: Array of dtype uint8, int8, int16, int32, float32 or float64 with 1 to 255 dimensions.
        compress: Gzip the output; default: when ``path`` ends in ``.gz``.

    Returns:
        The path written.

    Raises:
        ValueError: The dtype or number of dimensions cannot be stored in IDX.
    """
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"dtype {array.dtype} cannot be stored in an IDX file")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path
