"""Reading and forging summary files in tests: the format-3 hash scheme re-implemented independently of
laftr.io, so that tests pin the file format and can build files whose hashes are right for what they hold."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def split(raw: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return st_load(raw), json.loads(header["__metadata__"]["laftr"])


def write(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    return st_save(tensors, metadata={"laftr": json.dumps(meta)})


def tensor_sha256(t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    h = hashlib.sha256(f"{dtype};{list(t.shape)};".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def forge(tensors: dict[str, torch.Tensor], meta: dict, records: bool = True) -> bytes:
    """A format-3 file whose hashes are correct for whatever ``tensors`` and ``meta`` hold."""
    meta = dict(meta)
    if records:
        old = meta.get("tensors", {})
        meta["tensors"] = {
            k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": tensor_sha256(t),
                **({"infinite": True} if old.get(k, {}).get("infinite") else {})}
            for k, t in tensors.items()
        }
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    meta["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return write(tensors, meta)
