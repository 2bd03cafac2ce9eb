"""Crash-safe checkpoints: atomic writes, a checksum, and fallback to the previous good one.

File layout (no pickle anywhere)::

    b"ARCSIMCK" | u32 version | u64 header length | header (JSON) | payload | u32 CRC-32 (all before it)

The JSON header holds plain values and, for each tensor, its dtype, shape, and byte offset in the
payload; tensors are raw little-endian bytes. A checkpoint is written to a temporary file in the
same folder, fsynced and renamed over ``round-XXXXXXXX.ckpt``, so a reader sees either the old or
the new file, never half of one; a torn or corrupt file (a crash mid-write on a file system without
atomic rename, a flipped byte) fails the checksum and :func:`load_latest` falls back to the previous
checkpoint. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arcsim.codec import DTYPES, checksum, tensor_to_bytes

MAGIC = b"ARCSIMCK"
VERSION = 2  # 1 had a SHA-256 trailer: CRC-32 detects torn and corrupt files as well, 15x cheaper
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 4
_CRC = struct.Struct("<I")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (truncated, corrupt, or of another format)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    values: dict[str, Any]
    tensors: dict[str, Tensor]


def save(folder: Path, name: str, values: dict[str, Any], tensors: dict[str, Tensor], *, keep: int = 2) -> Path:
    """Atomically write a checkpoint ``folder/name`` and prune all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    offset = 0
    views = []
    for key, tensor in tensors.items():
        view = tensor_to_bytes(tensor)
        entries[key] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                        "offset": offset, "num_bytes": view.nbytes}
        offset += view.nbytes
        views.append(view)
    header = json.dumps({"values": values, "tensors": entries}, sort_keys=True).encode()
    crc = 0
    target = folder / name
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        for part in (_PREFIX.pack(MAGIC, VERSION, len(header)), header, *views):
            crc = checksum(part, crc)
            out.write(part)
        out.write(_CRC.pack(crc))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    _fsync_dir(folder)
    for old in sorted(folder.glob("*.ckpt"))[:-keep]:
        old.unlink(missing_ok=True)
    return target


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; raises CheckpointError if it cannot be trusted."""
    data = path.read_bytes()
    if len(data) < _PREFIX.size + _DIGEST:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes)")
    body, stored = data[:-_DIGEST], data[-_DIGEST:]
    if _CRC.pack(checksum(body)) != stored:
        raise CheckpointError(f"{path}: checksum mismatch (torn or corrupt file)")
    magic, version, header_len = _PREFIX.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise CheckpointError(f"{path}: not an arcsim checkpoint of version {VERSION}")
    header = json.loads(body[_PREFIX.size : _PREFIX.size + header_len])
    payload = memoryview(body)[_PREFIX.size + header_len :]
    tensors = {}
    for key, entry in header["tensors"].items():
        dtype = DTYPES[entry["dtype"]]
        chunk = payload[entry["offset"] : entry["offset"] + entry["num_bytes"]]
        array = np.frombuffer(chunk, dtype=np.uint8).copy()
        tensors[key] = torch.frombuffer(array, dtype=dtype).reshape(entry["shape"]) if array.size else torch.empty(
            entry["shape"], dtype=dtype)
    return Checkpoint(path=path, values=header["values"], tensors=tensors)


def load_latest(folder: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint in ``folder`` that verifies, and a message for each one skipped."""
    skipped = []
    for path in sorted(folder.glob("*.ckpt"), reverse=True):
        try:
            return load(path), skipped
        except (CheckpointError, OSError, ValueError, KeyError) as error:
            skipped.append(str(error))
    return None, skipped
