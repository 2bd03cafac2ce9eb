"""Tensors as bytes, and their CRC-32: what the wire format and the checkpoints share (core layer).

A tensor's bytes are its values C-contiguous and little-endian; :func:`checksum` is zlib's CRC-32.
No gRPC or protobuf here: the transport (arcsim.transport.codec) and the engine's checkpoints both
build on this module.
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import torch

try:  # zlib-ng's CRC-32: the same function as zlib's (same polynomial, same values), SIMD (docs/benchmarks.md)
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - without the zlib-ng package: zlib's, the reference
    from zlib import crc32 as _crc32

DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Wire name -> torch dtype, for every dtype the protocol carries."""

DTYPE_NAMES: Final[dict[torch.dtype, str]] = {dtype: name for name, dtype in DTYPES.items()}
"""torch dtype -> wire name (the reverse of :data:`DTYPES`)."""

_BIG_ENDIAN_HOST: Final[bool] = sys.byteorder == "big"


def checksum(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32 (zlib) of ``data``, as an unsigned 32-bit int; ``value`` continues a running CRC.

    It detects accidental corruption (a truncated or garbled transfer), not forgery: anyone can
    recompute it. Authenticity and integrity against an attacker come from the credentials and TLS.

    >>> checksum(b"123456789") == 0xCBF43926
    True
    """
    return _crc32(data, value) & 0xFFFFFFFF


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t``: C-contiguous, little-endian, as a read-only 1-D byte view.

    Built on ``Tensor.numpy()``, with no copy when ``t`` is already a contiguous CPU tensor (the
    view then aliases ``t``: do not modify ``t`` while the bytes are in use). ``t`` itself is never
    modified. bfloat16, which numpy lacks, goes through a same-width int16 view.

    >>> bytes(tensor_to_bytes(torch.tensor([1.0], dtype=torch.float16)))
    b'\\x00<'
    """
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {t.dtype} is not one of {sorted(DTYPES)}")
    src = t.detach()
    if src.device.type != "cpu":
        src = src.cpu()
    src = src.contiguous()
    if src.dtype == torch.bfloat16:
        src = src.view(torch.int16)
    array = src.numpy().reshape(-1)
    if _BIG_ENDIAN_HOST:
        array = array.byteswap()
    return memoryview(array.view(np.uint8)).toreadonly()
