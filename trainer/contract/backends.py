"""Where a store's ledger, jobs and files live, as the settings choose: the one place that turns
``LAMINA_DATABASE_URL`` and ``LAMINA_STORE`` into backends, so the server and the worker open
the same store the same way.

- nothing set: files under the store's directory (the embedded default);
- ``LAMINA_DATABASE_URL``: the ledger, the writer lock and the job board in PostgreSQL (the
  schema is brought up to date once per process);
- ``LAMINA_STORE=s3://...``: the versions' files in object storage too, each process keeping a
  verified local copy under ``<home>/copies/<digest of the URL>``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from trainer.contract.board import JobBoard
from trainer.contract.settings import LaminaSettings


@cache
def migrated(url: str) -> str:
    """``url``, its schema brought up to date once per process: every backend built on it (here and
    the server's fine-tuning files) calls this, so no construction migrates again."""
    from adapters_store.database import migrate

    migrate(url)
    return url


def database_problem(settings: LaminaSettings) -> str | None:
    """One line saying why the database cannot be used (unreachable, refused the schema), for the
    ``lamina serve`` and ``lamina worker`` commands to stop with at start; None when it can."""
    if not settings.database_url:
        return None
    from adapters_store.database import UNAVAILABLE

    try:
        migrated(settings.database_url)
    except UNAVAILABLE as error:
        return f"LAMINA_DATABASE_URL: cannot reach PostgreSQL ({str(error).splitlines()[0]})"
    return None


def store_backends(settings: LaminaSettings) -> dict[str, Any]:
    """Keyword arguments for :class:`adapters_store.store.AdapterStore`: the ledger, the object
    storage and the store's shared name."""
    ledger = objects = None
    if settings.database_url:
        from adapters_store.ledger_database import DatabaseLedger

        ledger = DatabaseLedger(migrated(settings.database_url), settings.store_location)
    if settings.store is not None and settings.store_is_remote:
        from adapters_store.blobs import ObjectStorage

        options = {"endpoint_url": settings.s3_endpoint_url} if settings.s3_endpoint_url else {}
        objects = ObjectStorage(settings.store, options)
    return {"ledger": ledger, "objects": objects, "location": settings.store_location}


def open_board(settings: LaminaSettings) -> JobBoard:
    """The store's job board: JSON files beside the store, or rows in the database."""
    if settings.database_url:
        from trainer.contract.board_database import DatabaseJobRecords

        return JobBoard(records=DatabaseJobRecords(migrated(settings.database_url), settings.store_location))
    return JobBoard(settings.store_dir)
