"""Crash-safe checkpoints in safetensors files: atomic writes, a checksum, fallback to the previous good one.

File layout: ``out_dir/checkpoints/round-XXXXXXXX.safetensors``, a plain safetensors file (no pickle
anywhere) whose tensors are the run's state (``params``, ``momentum/<worker id>``, and for an attack
that keeps a state across rounds ``attack_state/<name>``) and whose
metadata (string -> string) holds

- ``format``: :data:`FORMAT`, so that another safetensors file is not taken for a checkpoint;
- ``values``: the scalar state (round, config digest, accuracies, ...) as one JSON object;
- ``crc32``: the CRC-32 (8 hex digits) of the format, the values' JSON, each tensor's name, dtype
  and shape, and each tensor's little-endian bytes, tensors in name order.

Any safetensors reader opens the file; :func:`load` also verifies the CRC. A checkpoint is written
to a temporary file in the same folder, fsynced and renamed over its final name (and the folder
fsynced), so a reader sees either the old or the new file, never half of one; a torn or corrupt file
(a crash mid-write on a file system without atomic rename, a flipped byte) fails the safetensors
header parse or the CRC, and :func:`load_latest` falls back to the previous checkpoint. The newest
``keep`` checkpoints are kept. :func:`save_tensors` is the same atomic write for other tensor files
(the run's final ``model.safetensors``).

Checkpoints of arcsim's earlier own format (``round-XXXXXXXX.ckpt``) are not read: a folder holding
only those is refused with an error that says so, rather than a run silently starting over.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import safetensors
import safetensors.torch
from torch import Tensor

from arcsim.tensorbytes import DTYPE_NAMES, checksum, tensor_to_bytes

FORMAT: Final[str] = "arcsim-checkpoint-3"  # 1 and 2 were arcsim's own ``.ckpt`` layout
SUFFIX: Final[str] = ".safetensors"
OLD_SUFFIX: Final[str] = ".ckpt"
_HEADER_LENGTH = struct.Struct("<Q")  # a safetensors file starts with its JSON header's length


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (truncated, corrupt, or of another format)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    values: dict[str, Any]
    tensors: dict[str, Tensor]


def save(folder: Path, name: str, values: Mapping[str, Any], tensors: Mapping[str, Tensor], *, keep: int = 2) -> Path:
    """Atomically write the checkpoint ``folder/name`` (``round-XXXXXXXX.safetensors``) and prune all
    but the newest ``keep``. ``values`` must be JSON data; ``tensors`` CPU tensors of the dtypes the
    wire carries (float32, float64, float16, bfloat16), never modified while this runs."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        raise ValueError(f"a checkpoint's name must end with {SUFFIX!r} and not start with '.', got {name!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    stored = _unshared({key: tensors[key] for key in sorted(tensors)})
    values_json = json.dumps(dict(values), sort_keys=True)
    metadata = {"format": FORMAT, "values": values_json, "crc32": f"{_crc(values_json, stored):08x}"}
    target = save_tensors(folder / name, stored, metadata=metadata)
    for old in sorted(folder.glob(f"*{SUFFIX}"))[:-keep]:
        old.unlink(missing_ok=True)
    return target


def save_tensors(path: Path, tensors: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` as the safetensors file ``path``: a temporary file in the same
    folder, fsynced, renamed over ``path``, and the folder fsynced (so the rename survives a crash)."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        # safetensors writes through a temporary file of its own, created 0600; the result gets the mode
        # any file this process creates has (its umask), like rounds.jsonl, read from a file made so.
        with open(tmp, "wb"):
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        safetensors.torch.save_file(dict(tensors), tmp, metadata=None if metadata is None else dict(metadata))
        os.chmod(tmp, mode)
        # The fsync goes through a descriptor of our own: it flushes the file's data whoever wrote it.
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(folder)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` on the CPU and contiguous, each with memory of its own: safetensors refuses two
    names for the same memory (e.g. one vector stored as two workers' momenta); a copy only then."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def _crc(values_json: str, tensors: Mapping[str, Tensor]) -> int:
    """CRC-32 of everything a checkpoint holds: a flip in any name, dtype, shape, value or tensor byte
    changes it (the safetensors header itself has no checksum)."""
    names = sorted(tensors)
    layout = json.dumps(
        [[key, DTYPE_NAMES.get(tensors[key].dtype, str(tensors[key].dtype)), list(tensors[key].shape)] for key in names]
    )
    crc = checksum(f"{FORMAT}\n{values_json}\n{layout}\n".encode())
    for key in names:
        crc = checksum(tensor_to_bytes(tensors[key]), crc)
    return crc


def load(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; raises CheckpointError if it cannot be trusted."""
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)  # parses and checks the header, offsets and sizes
        (header_length,) = _HEADER_LENGTH.unpack_from(data)
        header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + header_length])
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file (torn or corrupt): {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CheckpointError(f"{path}: not an arcsim checkpoint of format {FORMAT} (format {found!r})")
    try:
        values_json = metadata["values"]
        # compared as text: "5DF44119" would parse to the same number, and is a flipped byte all the same
        matches = f"{_crc(values_json, tensors):08x}" == metadata["crc32"]
        values = json.loads(values_json) if matches else None
    except (KeyError, TypeError, ValueError) as error:  # a dtype the wire lacks raises a ValueError too
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {error!r}") from None
    if not matches:
        raise CheckpointError(f"{path}: checksum mismatch (torn or corrupt file)")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its values are not a JSON object")
    return Checkpoint(path=path, values=values, tensors=tensors)


def load_latest(folder: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint in ``folder`` that verifies, and a message for each one skipped.

    Raises CheckpointError when none verifies and ``folder`` holds checkpoints of the earlier
    ``.ckpt`` format, which this version does not read.
    """
    skipped = []
    for path in sorted(folder.glob(f"*{SUFFIX}"), reverse=True):
        try:
            return load(path), skipped
        except (CheckpointError, OSError) as error:
            skipped.append(str(error))
    old = sorted(path.name for path in folder.glob(f"*{OLD_SUFFIX}"))
    if old:
        raise CheckpointError(
            f"{folder} holds checkpoints of arcsim's earlier format ({', '.join(old)})"
            + (f" and no usable {SUFFIX} one ({len(skipped)} skipped)" if skipped else f" and no {SUFFIX} one")
            + f": this version reads round-XXXXXXXX{SUFFIX} only; finish that run with the arcsim version "
            "that wrote it, or start it again in a new folder"
        )
    return None, skipped


def any_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint file of this format or the earlier one (whether a
    ``--resume-if-present`` should resume: an earlier-format one then fails with a clear error)."""
    return any(True for suffix in (SUFFIX, OLD_SUFFIX) for _ in folder.glob(f"*{suffix}"))
