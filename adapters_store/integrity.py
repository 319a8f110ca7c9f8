"""Checksums of a version's files: written into the ledger when the version is published,
checked before anything reads the version's contents.

Why: a version is immutable once the ledger names it, so any difference between its files and
the digests recorded beside its ledger entry (a truncated write that a crash or a full disk left
behind, a flipped bit, a file removed or replaced by hand) means the version is not what was
published, and serving it would put an unknown model live. The ledger is the reference because
it is append-only and fsynced, while the version directory is what can be damaged or swapped.

A file is hashed once per process while its inode, size, mtime and ctime stay the same (a
rewrite changes at least the ctime, which no user can set), so servers that check every live
version on every sync read each file once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from adapters_store.errors import CorruptVersion

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_cache: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat key, sha256)
_cache_lock = threading.Lock()
_warned: set[str] = set()  # versions already reported as unverified (old ledgers)


def _stat_key(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), from the cache while the file has not changed."""
    key = _stat_key(path)
    with _cache_lock:
        cached = _cache.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _cache_lock:
        _cache[str(path)] = (key, value)
    return value


def digest_tree(directory: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every regular file under ``directory``, sorted by path."""
    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def verify_tree(directory: Path, expected: dict[str, str] | None, label: str) -> None:
    """Raise :class:`CorruptVersion` naming the first file of ``label`` (e.g. ``task beta/v1``)
    that is missing or differs from ``expected``. Files that ``expected`` does not list are
    ignored. ``expected`` None (a version published before checksums were recorded) passes,
    with one warning per version and process."""
    if expected is None:
        if label not in _warned:
            _warned.add(label)
            log.warning("%s has no recorded checksums (an older ledger); loading it unverified", label)
        return
    for relative, digest in expected.items():
        path = directory / relative
        if not path.is_file():
            raise CorruptVersion(f"{label}: {relative} is missing from {directory}")
        actual = sha256_file(path)
        if actual != digest:
            size = path.stat().st_size
            raise CorruptVersion(
                f"{label}: {relative} ({size} bytes) has sha256 {actual[:12]}…, "
                f"the ledger recorded {digest[:12]}…: the file was truncated or changed after publishing"
            )


def content_id(directory: Path, files: dict[str, str] | None) -> str:
    """A short name for what a version holds: the sha256 of its files' digests (as its ledger
    recorded them, or read from disk for a version published before checksums were recorded).

    Why: anything derived from a version and cached outside the store (a server's corrections,
    an SVD export) must be keyed by content. Version and merge ids restart in every store, so a
    key made of ids alone hands one store's derived files to another."""
    digests = files if files is not None else digest_tree(directory)
    joined = "\n".join(f"{relative} {digest}" for relative, digest in sorted(digests.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
