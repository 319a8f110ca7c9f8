"""The fine-tuning API's uploaded files in PostgreSQL (``lamina_files``), for servers on several
hosts that share a database but no directory: a file uploaded to one is used on any.

One row per file, its object and its bytes written by one ``INSERT``, so a visible file always has
its bytes. Ids are checked (:func:`checked_file_id`) before any query, as the file store checks
them before building a path. The schema is ``adapters_store/migrations``'.
"""

from __future__ import annotations

from psycopg.types.json import Jsonb

from adapters_store.database import connect
from server.finetuning.files import checked_file_id, file_not_found, new_file, newest_first
from server.finetuning.protocol import FileObject

__all__ = ["DatabaseFileStore"]


class DatabaseFileStore:
    """The uploaded files of the store ``store`` in the database at ``url`` (a :class:`Files`),
    rows rather than files so that every host sharing the database sees every upload."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store

    def create(self, content: bytes, filename: str, purpose: str) -> FileObject:
        record = new_file(content, filename, purpose)
        with connect(self.url) as connection:
            connection.execute(
                "INSERT INTO lamina_files (store, id, object, content) VALUES (%s, %s, %s, %s)",
                (self.store, checked_file_id(record.id), Jsonb(record.model_dump(mode="json")), content),
            )
        return record

    def get(self, file_id: str, param: str = "file_id") -> FileObject:
        checked_file_id(file_id, param)
        with connect(self.url) as connection:
            row = connection.execute(
                "SELECT object FROM lamina_files WHERE store = %s AND id = %s", (self.store, file_id)
            ).fetchone()
        if row is None:
            raise file_not_found(file_id, param)
        return FileObject.model_validate(row[0])

    def content(self, file_id: str, param: str = "file_id") -> bytes:
        checked_file_id(file_id, param)
        with connect(self.url) as connection:
            row = connection.execute(
                "SELECT content FROM lamina_files WHERE store = %s AND id = %s", (self.store, file_id)
            ).fetchone()
        if row is None:
            raise file_not_found(file_id, param)
        return bytes(row[0])

    def all(self) -> list[FileObject]:
        """Every file, newest first (ties broken by id, so pages are stable)."""
        with connect(self.url) as connection:
            rows = connection.execute(
                "SELECT object FROM lamina_files WHERE store = %s", (self.store,)
            ).fetchall()
        return newest_first([FileObject.model_validate(row[0]) for row in rows])

    def delete(self, file_id: str) -> None:
        """Remove a file, object and bytes at once. Jobs keep their own copy of the examples, so
        deleting a job's file never affects the job."""
        checked_file_id(file_id)
        with connect(self.url) as connection:
            row = connection.execute(
                "DELETE FROM lamina_files WHERE store = %s AND id = %s RETURNING id", (self.store, file_id)
            ).fetchone()
        if row is None:
            raise file_not_found(file_id)
