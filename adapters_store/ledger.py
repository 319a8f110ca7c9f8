"""The store's append-only log and its writer lock, behind one small interface with two
backends: ``ledger.jsonl`` in the store's directory (here, the embedded default) and rows in
PostgreSQL (:mod:`adapters_store.ledger_database`, when ``LAMINA_DATABASE_URL`` is set).

Kept apart from :mod:`adapters_store.store` because it is the one piece whose crash behaviour
matters byte by byte: an operation's entries land together or not at all, in one ``write`` +
``fsync`` here, in one transaction there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from adapters_store.atomic import locked_file

log = logging.getLogger(__name__)


def now() -> str:
    """The ledger's and the metas' timestamp format (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


STORE_FILE = "store.json"
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = ".lock"
STORE_FORMAT = 1


class LedgerBackend(Protocol):
    """Where a store keeps its ledger, its writer lock and the base model it was created for.

    Every entry a reader gets is a dict with ``seq`` (1, 2, ... per store) and ``ts``; both
    backends hand out the same dicts, so the store's logic never asks which one it has."""

    @property
    def location(self) -> str:
        """Where the ledger is, for log lines and error messages."""
        ...

    def read(self) -> list[dict[str, Any]]: ...

    def append(
        self, entries: list[dict[str, Any]], guard: Callable[[object | None], None] | None = None
    ) -> list[dict[str, Any]]:
        """Stamp ``entries`` with the next ``seq`` numbers and the time; all land or none do.
        ``guard`` runs right before they are written and refuses by raising: it gets the database
        transaction that will write them (None for the file ledger), so a check made there (the
        publisher's fence) commits with the entries."""
        ...

    def writer_lock(self) -> AbstractContextManager[None]:
        """Held by every writer of the store for the whole of its change (one at a time)."""
        ...

    def stamp(self) -> object:
        """A value that changes whenever an entry is appended: what a server polls."""
        ...

    def bind(self, fingerprint: str) -> str:
        """Record ``fingerprint`` as the store's base model if none is recorded yet; returns the
        recorded one, so that opening a store with another base model can be refused."""
        ...


class Ledger:
    """``ledger.jsonl``: one JSON object per line, each with ``seq`` and ``ts``.

    Appends hold an exclusive ``flock`` on the file, write all of one operation's entries in
    a single write and fsync, so an operation's entries appear together. A torn last line
    (a crash mid-write) is ignored by readers and cut off by the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def stamp(self) -> object:
        """The file's size and mtime: the ledger only grows, so any append changes them."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def read(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def append(
        self, entries: list[dict[str, Any]], guard: Callable[[object | None], None] | None = None
    ) -> list[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if guard is not None:
                guard(None)
            data = read_all(fd)
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("ledger %s: dropping a torn last line of %d bytes", self.path, len(data) - keep)
                os.ftruncate(fd, keep)
            lines = [line for line in data[:keep].splitlines() if line.strip()]
            seq = json.loads(lines[-1])["seq"] if lines else 0
            ts = now()
            stamped = [{"seq": seq + i, "ts": ts, **entry} for i, entry in enumerate(entries, start=1)]
            payload = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in stamped)
            try:
                os.lseek(fd, keep, os.SEEK_SET)
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, keep)  # all of the operation or none of it
                raise
            return stamped
        finally:
            os.close(fd)  # also releases the lock


class FileLedger(Ledger):
    """The embedded default: ``ledger.jsonl``, the writer lock (``flock`` on ``.lock``) and
    ``store.json`` (the base model's fingerprint, fixed when the store is created), all in the
    store's directory, so a store is one folder that can be copied as a whole."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / LEDGER_FILE)
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    def writer_lock(self) -> AbstractContextManager[None]:
        return locked_file(self.root / LOCK_FILE)

    def bind(self, fingerprint: str) -> str:
        path = self.root / STORE_FILE
        if not path.exists():
            info = {"format": STORE_FORMAT, "fingerprint": fingerprint, "created_at": now()}
            tmp = path.with_name(f".{STORE_FILE}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(info, indent=2))
            try:
                os.link(tmp, path)  # atomic and exclusive: a concurrent creator's file wins whole
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return str(json.loads(path.read_text())["fingerprint"])


def read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
