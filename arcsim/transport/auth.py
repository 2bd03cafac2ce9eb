"""Per-worker credentials derived from one run secret.

Worker ``i`` of role ``r`` holds the bearer token ``HMAC-SHA256(secret, "arcsim/v1/<r>/<i>")`` (hex).
A role token (``<i>`` = ``*``) allows only ``Join`` with worker id -1: the coordinator assigns the
first free id of the role and returns that id's token (scaled containers all start alike).
The coordinator, which knows the secret, recomputes the tokens of every worker of the run and
maps a presented token to exactly one (role, worker id): a token cannot be used for another id or
role, and only Byzantine (adversary) tokens may call ``Observe``. Tokens travel in the call
metadata as ``authorization: Bearer <token>``; use TLS on untrusted networks, since a bearer token
is only as secret as the channel that carries it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

METADATA_KEY = "authorization"
ANY_ID = -1  # the worker id a role token stands for
SECRET_ENV = "ARCSIM_SECRET"
TOKEN_ENV = "ARCSIM_TOKEN"


def new_secret() -> str:
    return secrets.token_hex(32)


def worker_token(secret: str, role: str, worker_id: int) -> str:
    """The token of worker ``worker_id`` of ``role``; ``ANY_ID`` gives the role token."""
    part = "*" if worker_id == ANY_ID else str(int(worker_id))
    message = f"arcsim/v1/{role}/{part}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((METADATA_KEY, f"Bearer {token}"),)


def token_from_metadata(metadata: object) -> str | None:
    for key, value in metadata or ():  # type: ignore[union-attr]
        if key == METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class TokenBook:
    """Maps every valid token of a run to its (role, worker id)."""

    def __init__(self, secret: str, *, num_honest: int, num_byzantine: int) -> None:
        self._secret = secret
        self._owners: dict[str, tuple[str, int]] = {}
        for worker_id in range(num_honest + num_byzantine):
            role = "honest" if worker_id < num_honest else "byzantine"
            self._owners[worker_token(secret, role, worker_id)] = (role, worker_id)
        for role in ("honest", "byzantine"):
            self._owners[worker_token(secret, role, ANY_ID)] = (role, ANY_ID)

    def token_for(self, role: str, worker_id: int) -> str:
        return worker_token(self._secret, role, worker_id)

    def owner(self, token: str | None) -> tuple[str, int] | None:
        # A hash-table lookup, not a scan: it does not reveal how much of a wrong token matched.
        return None if token is None else self._owners.get(token)


def read_secret(path: str | None) -> str:
    """The run secret from a file, else from $ARCSIM_SECRET; a clear error when neither is set."""
    if path:
        text = Path(path).read_text().strip()
        if not text:
            raise ValueError(f"secret file {path} is empty")
        return text
    value = os.environ.get(SECRET_ENV, "").strip()
    if not value:
        raise ValueError(f"no run secret: pass --secret-file or set {SECRET_ENV}")
    return value
