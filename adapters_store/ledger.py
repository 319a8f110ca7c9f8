"""``ledger.jsonl``, the store's append-only log, and the file-level helpers a version write needs.

Kept apart from :mod:`adapters_store.store` because it is the one piece whose crash behaviour
matters byte by byte: an operation's entries land in one ``write`` + ``fsync`` or not at all.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def now() -> str:
    """The ledger's and the metas' timestamp format (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """``ledger.jsonl``: one JSON object per line, each with ``seq`` and ``ts``.

    Appends hold an exclusive ``flock`` on the file, write all of one operation's entries in
    a single write and fsync, so an operation's entries appear together. A torn last line
    (a crash mid-write) is ignored by readers and cut off by the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def append(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
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
