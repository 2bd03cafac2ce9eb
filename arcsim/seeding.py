"""Deterministic random streams.

Every random draw in arcsim (data order, partition, attack noise, model initialisation) comes from a
generator seeded by ``derive_seed(run_seed, *parts)``, for example ``(seed, "batch", round, worker_id)``.
The same config and seed therefore give the same draws whatever the timing, the process layout
or the engine.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: int | str) -> int:
    """Return a 63-bit seed that depends only on ``seed`` and ``parts``.

    >>> derive_seed(1, "batch", 3, 0) == derive_seed(1, "batch", 3, 0)
    True
    >>> derive_seed(1, "batch", 3, 0) != derive_seed(1, "batch", 3, 1)
    True
    """
    text = "/".join([str(int(seed))] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *parts))
    return g
