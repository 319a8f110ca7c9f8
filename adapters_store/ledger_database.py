"""The store's ledger, writer lock and fingerprint in PostgreSQL (``LAMINA_DATABASE_URL``): what
lets replicas and workers on several hosts share one store with no shared directory.

The semantics are the file ledger's (:class:`adapters_store.ledger.FileLedger`), moved to where
they hold across machines:

- an append is one transaction that numbers its entries after the last ``seq`` under a
  transaction-scoped advisory lock, so an operation's entries land together or not at all and
  ``seq`` has no gaps; a publisher's fence is checked inside it (with a job board in the same
  database, the claim is renewed in it too), so a fenced publish is one commit;
- the writer lock is a session advisory lock on a connection held for the whole change; if that
  connection dies the database releases the lock, and the publisher's fence (checked again just
  before the append) still stops a publisher that lost its claim meanwhile;
- the fingerprint is a row written once, when the store is first opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from adapters_store.database import connect, lock_key
from adapters_store.ledger import now

log = logging.getLogger(__name__)


class DatabaseLedger:
    """One store's ledger in the database at ``url``; ``store`` names the store (its location as
    the settings give it), so several stores share one database."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store

    @property
    def location(self) -> str:
        return f"{self.store} (ledger in the database)"

    def read(self) -> list[dict[str, Any]]:
        with connect(self.url) as connection:
            rows = connection.execute(
                "SELECT entry FROM lamina_ledger WHERE store = %s ORDER BY seq", (self.store,)
            ).fetchall()
        return [row[0] for row in rows]

    def append(
        self, entries: list[dict[str, Any]], guard: Callable[[object | None], None] | None = None
    ) -> list[dict[str, Any]]:
        with connect(self.url) as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("lamina-ledger", self.store),))
            if guard is not None:
                guard(connection)  # e.g. the publisher's claim, checked and renewed in this transaction
            seq = self._last_seq(connection)
            ts = now()
            stamped = [{"seq": seq + i, "ts": ts, **entry} for i, entry in enumerate(entries, start=1)]
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO lamina_ledger (store, seq, entry) VALUES (%s, %s, %s)",
                    [(self.store, entry["seq"], Jsonb(entry)) for entry in stamped],
                )
        return stamped

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        key = lock_key("lamina-writer", self.store)
        with connect(self.url) as connection:
            connection.autocommit = True  # a session lock, not a transaction left open
            connection.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                try:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
                except Exception:  # the connection is gone, and with it the lock
                    log.warning("the writer lock's connection for %s was lost", self.store)

    def stamp(self) -> object:
        with connect(self.url) as connection:
            return self._last_seq(connection)

    def _last_seq(self, connection: psycopg.Connection[Any]) -> int:
        """The store's last ``seq`` (0: no entry yet)."""
        row = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM lamina_ledger WHERE store = %s", (self.store,)
        ).fetchone()
        return int(row[0]) if row else 0

    def bind(self, fingerprint: str) -> str:
        with connect(self.url) as connection:
            connection.execute(
                "INSERT INTO lamina_stores (store, fingerprint) VALUES (%s, %s) ON CONFLICT (store) DO NOTHING",
                (self.store, fingerprint),
            )
            row = connection.execute(
                "SELECT fingerprint FROM lamina_stores WHERE store = %s", (self.store,)
            ).fetchone()
        assert row is not None
        return str(row[0])
