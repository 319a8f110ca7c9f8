"""One way to replace a file so that readers see the old content or the new, never half of it,
and one way to hold a lock file across processes.

The job board, the fine-tuning API's files and the stats cache all write this way; the store's
versions are directories and have their own rename in :mod:`adapters_store.versions`.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: every process on
    this host that locks the same file waits its turn. The lock goes with the process if it dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a hidden sibling, flush it to disk, then rename it over ``path`` in
    one step; the sibling is removed if anything fails, so no temporary file is left behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """``data`` (text is written as UTF-8) into ``path`` with :func:`write_atomically`."""
    payload = data.encode() if isinstance(data, str) else data
    write_atomically(path, lambda tmp: tmp.write_bytes(payload))
