"""Fetch a file over HTTP(S) or ``file://`` and keep it only once its checksum verifies.

:func:`fetch_verified` streams the URL into ``<target>.part`` next to the target, computes the
digest of what arrived, and renames the part file onto the target only if the digest is the
expected one. Whatever goes wrong (a network error, a connection that drops before the
announced ``Content-Length``, an interrupt, a checksum mismatch) the part file is removed, so a
folder never holds an unverified file under a final name. :func:`extract_members` takes named
regular files out of a ``.tar.gz`` the same way, without ever writing a path the archive names
(no traversal, links or devices).

The dataset-specific tables (URLs, checksums, file names) live in :mod:`arcsim.tasks.datasets`;
this module only knows files.

Example:

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> source = folder / "source.bin"
>>> _ = source.write_bytes(b"arcsim")
>>> digest = hashlib.sha256(b"arcsim").hexdigest()
>>> fetch_verified(source.as_uri(), folder / "copy.bin", expected_sha256=digest).read_bytes()
b'arcsim'
>>> shutil.rmtree(folder)
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["DownloadFailed", "extract_members", "fetch_verified", "file_sha256"]

_CHUNK = 1 << 20


class DownloadFailed(RuntimeError):
    """A file could not be fetched, verified or extracted; nothing unverified was left behind."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of the file's bytes as lowercase hex, read in 1 MiB chunks (archives are large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def fetch_verified(
    url: str,
    target: str | Path,
    *,
    expected_sha256: str,
    timeout_s: float = 60.0,
    digest: Callable[[Path], str] = file_sha256,
    digest_name: str = "SHA-256",
) -> Path:
    """Download ``url`` to ``target`` if ``digest(file) == expected_sha256``; return ``target``.

    ``digest`` defaults to the SHA-256 of the downloaded bytes; a caller that pins something else
    (e.g. a decompressed payload) passes its own and names it in ``digest_name`` for the error
    message. A digest that raises ``ValueError`` counts as a mismatch, with its message as reason.
    Raises :class:`DownloadFailed` naming the URL; the target is then left as it was and no
    ``.part`` file remains.
    """
    target = Path(target)
    part = _part_path(target)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, part.open("wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
                received, announced = out.tell(), response.headers.get("Content-Length")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise DownloadFailed(f"could not download {url}: {exc}") from exc
        # Chunked reads end quietly when the server drops the connection early: say so rather
        # than report the short file as a checksum mismatch.
        if announced is not None and announced.isdigit() and received != int(announced):
            raise DownloadFailed(
                f"could not download {url}: the transfer stopped after {received} of {announced} bytes"
            )
        try:
            actual = digest(part)
        except ValueError as exc:
            actual = f"({exc})"
        if actual != expected_sha256:
            raise DownloadFailed(
                f"checksum mismatch for {url}: {digest_name} {actual}, expected {expected_sha256}; "
                "the file was discarded"
            )
        os.replace(part, target)
    finally:
        # Also on KeyboardInterrupt: an interrupted download must not look like a finished one.
        part.unlink(missing_ok=True)
    return target


def extract_members(archive: str | Path, dest: str | Path, names: Collection[str]) -> list[Path]:
    """Extract the regular files whose base names are ``names`` from a ``.tar.gz`` into ``dest``.

    Members are matched by base name wherever they sit in the archive (``cifar-10-batches-bin/
    data_batch_1.bin`` gives ``dest/data_batch_1.bin``); other members are skipped. Each file is
    written to ``.part`` and renamed when complete. Raises :class:`DownloadFailed` for an
    unreadable archive or a name it lacks; files extracted before the failure are removed.
    """
    archive, dest = Path(archive), Path(dest)
    wanted = set(names)
    written: list[Path] = []
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted or not member.isreg() or dest / base in written:
                    continue
                source = tar.extractfile(member)
                if source is None:  # isreg() members always have a stream; keep the type checker honest
                    continue
                target = dest / base
                part = _part_path(target)
                try:
                    with source, part.open("wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                    os.replace(part, target)
                finally:
                    part.unlink(missing_ok=True)
                written.append(target)
        missing = sorted(wanted - {path.name for path in written})
        if missing:
            raise DownloadFailed(f"{archive}: the archive lacks {', '.join(missing)}")
    except BaseException as exc:
        for path in written:  # all or nothing: a half-extracted set would pass a presence check
            path.unlink(missing_ok=True)
        if isinstance(exc, (tarfile.TarError, EOFError, zlib.error, OSError)):
            raise DownloadFailed(f"{archive}: cannot extract ({exc})") from exc
        raise
    return written
