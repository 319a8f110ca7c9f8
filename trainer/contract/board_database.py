"""The job board's records in PostgreSQL (``lamina_jobs``, ``lamina_job_examples``), for stores
whose hosts share a database rather than a file system that ``flock`` can lock across.

The board's critical section becomes one transaction holding a transaction-scoped advisory lock
keyed by the store: every read and write the board makes inside :meth:`DatabaseJobRecords.locked`
runs on that one connection, so a claim or a submission reads, decides and writes atomically and
commits once, and a process that dies mid-way leaves nothing half-written (the lock goes with
its connection). Calls outside the lock (reads, a job's examples) use a short connection each,
as :mod:`adapters_store.database` explains. The schema is ``adapters_store/migrations``'.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from adapters_store.database import connect, lock_key
from trainer.contract.board import EXAMPLE_KINDS, ExampleKind, checked_job_id
from trainer.contract.jobs import Job, JobNotFound

__all__ = ["DatabaseJobRecords"]


class _Current(threading.local):
    """The connection of the critical section this thread is in, if any: the API process calls
    the board from several threads, and each must use its own transaction, never another's."""

    connection: psycopg.Connection[Any] | None = None


class DatabaseJobRecords:
    """The jobs of the store ``store`` in the database at ``url`` (a :class:`JobRecords`)."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store
        self._current = _Current()

    @contextmanager
    def locked(self, connection: object | None = None) -> Iterator[None]:
        """One transaction under the store's board lock; re-entered, it joins the one open. Given
        ``connection`` (a transaction on this database, e.g. the ledger append's), it runs in that
        one, which commits or rolls back the board's writes together with its own."""
        if self._current.connection is not None:
            yield
            return
        with ExitStack() as stack:
            if not isinstance(connection, psycopg.Connection):
                connection = stack.enter_context(connect(self.url))  # a transaction of its own
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("lamina-board", self.store),))
            self._current.connection = connection
            try:
                yield
            finally:
                self._current.connection = None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._current.connection is not None:
            yield self._current.connection
        else:
            with connect(self.url) as connection:
                yield connection

    def write(self, job: Job) -> None:
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO lamina_jobs (store, id, seq, job) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store, id) DO UPDATE SET seq = EXCLUDED.seq, job = EXCLUDED.job",
                (self.store, checked_job_id(job.id), job.seq, Jsonb(job.model_dump(mode="json"))),
            )

    def get(self, job_id: str) -> Job:
        checked_job_id(job_id)
        with self._connection() as connection:
            row = connection.execute(
                "SELECT job FROM lamina_jobs WHERE store = %s AND id = %s", (self.store, job_id)
            ).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return Job.model_validate(row[0])

    def all(self) -> list[Job]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT job FROM lamina_jobs WHERE store = %s ORDER BY seq", (self.store,)
            ).fetchall()
        return [Job.model_validate(row[0]) for row in rows]

    def delete(self, job_id: str) -> None:
        with self._connection() as connection:
            connection.execute(
                "DELETE FROM lamina_jobs WHERE store = %s AND id = %s", (self.store, checked_job_id(job_id))
            )

    def put_examples(self, job_id: str, kind: ExampleKind, body: str) -> None:
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO lamina_job_examples (store, job_id, kind, body) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store, job_id, kind) DO UPDATE SET body = EXCLUDED.body",
                (self.store, checked_job_id(job_id), _checked_kind(kind), body),
            )

    def examples(self, job_id: str, kind: ExampleKind) -> str | None:
        with self._connection() as connection:
            row = connection.execute(
                "SELECT body FROM lamina_job_examples WHERE store = %s AND job_id = %s AND kind = %s",
                (self.store, checked_job_id(job_id), _checked_kind(kind)),
            ).fetchone()
        return None if row is None else str(row[0])

    def delete_examples(self, job_id: str) -> None:
        with self._connection() as connection:
            connection.execute(
                "DELETE FROM lamina_job_examples WHERE store = %s AND job_id = %s",
                (self.store, checked_job_id(job_id)),
            )


def _checked_kind(kind: str) -> str:
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown kind of examples: {kind!r}")
    return kind
