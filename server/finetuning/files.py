"""Uploaded fine-tuning files (``/v1/files``), kept in ``<store>/files/`` beside the job board so
every server replica that shares the store sees them.

A file is two entries: ``<id>.jsonl`` (the bytes as uploaded) and ``<id>.json`` (its OpenAI file
object). Each is written to a temporary name and renamed into place, content first, so a
visible file always has its bytes. Ids are ``file-`` + 24 hex digits and are checked before any
path is built from them, so no id can name a path outside the folder; the uploaded file name is
only ever recorded, never used as a path. With ``LAMINA_DATABASE_URL`` set they are rows in the
database instead (:mod:`server.finetuning.files_database`), so servers on several hosts share them.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path, PurePath
from typing import Protocol

from adapters_store.atomic import atomic_write
from server.errors import APIError
from server.finetuning.protocol import FileObject

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    return APIError(
        404, f"No such File object: {file_id}", param=param, code="file_not_found", type="not_found_error"
    )


def checked_file_id(file_id: str, param: str = "file_id") -> str:
    """``file_id`` if it has the shape of the ids :func:`new_file` gives, else a 404: an id comes
    from a URL or a request body, so a hostile one must read as an unknown file in every backend."""
    if not _FILE_ID.fullmatch(file_id):
        raise file_not_found(file_id, param)
    return file_id


def new_file(content: bytes, filename: str, purpose: str) -> FileObject:
    """The file object of a new upload: a fresh id; the uploaded name is kept only as a label."""
    name = PurePath(filename.replace("\\", "/")).name[:255] or "upload.jsonl"
    return FileObject(
        id=f"file-{secrets.token_hex(12)}",
        bytes=len(content),
        created_at=int(time.time()),
        filename=name,
        purpose=purpose,
    )


def newest_first(files: list[FileObject]) -> list[FileObject]:
    """Newest first, ties broken by id, so pages are stable."""
    return sorted(files, key=lambda f: (f.created_at, f.id), reverse=True)


class Files(Protocol):
    """Where a store's uploaded files live: :class:`FileStore` or, across hosts, the database's
    :class:`server.finetuning.files_database.DatabaseFileStore`."""

    def create(self, content: bytes, filename: str, purpose: str) -> FileObject: ...

    def get(self, file_id: str, param: str = "file_id") -> FileObject: ...

    def content(self, file_id: str, param: str = "file_id") -> bytes: ...

    def all(self) -> list[FileObject]: ...

    def delete(self, file_id: str) -> None: ...


class FileStore:
    """The uploaded files of one store."""

    def __init__(self, store_dir: Path) -> None:
        self.root = Path(store_dir) / "files"
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, file_id: str, param: str = "file_id") -> tuple[Path, Path]:
        checked_file_id(file_id, param)
        return self.root / f"{file_id}.json", self.root / f"{file_id}.jsonl"

    def create(self, content: bytes, filename: str, purpose: str) -> FileObject:
        record = new_file(content, filename, purpose)
        meta_path, content_path = self._paths(record.id)
        atomic_write(content_path, content)
        atomic_write(meta_path, record.model_dump_json().encode())
        return record

    def get(self, file_id: str, param: str = "file_id") -> FileObject:
        meta_path, _ = self._paths(file_id, param)
        try:
            return FileObject.model_validate_json(meta_path.read_bytes())
        except FileNotFoundError:
            raise file_not_found(file_id, param) from None

    def content(self, file_id: str, param: str = "file_id") -> bytes:
        self.get(file_id, param)
        _, content_path = self._paths(file_id, param)
        try:
            return content_path.read_bytes()
        except FileNotFoundError:  # deleted between the two reads
            raise file_not_found(file_id, param) from None

    def all(self) -> list[FileObject]:
        """Every file, newest first (ties broken by id, so pages are stable)."""
        files = []
        for path in self.root.glob("file-*.json"):
            try:
                files.append(FileObject.model_validate_json(path.read_bytes()))
            except (OSError, ValueError):  # vanished or being replaced: skip this round
                continue
        return newest_first(files)

    def delete(self, file_id: str) -> None:
        """Remove a file: its object first (it disappears from every listing at once), then its bytes.
        Jobs keep their own copy of the examples, so deleting a job's file never affects the job."""
        meta_path, content_path = self._paths(file_id)
        try:
            meta_path.unlink()
        except FileNotFoundError:
            raise file_not_found(file_id) from None
        content_path.unlink(missing_ok=True)
