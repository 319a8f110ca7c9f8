"""One way to replace a file so that readers see the old content or the new, never half of it.

The job board, the fine-tuning API's files and the stats cache all write this way; the store's
versions are directories and have their own rename in :mod:`adapters_store.versions`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


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
