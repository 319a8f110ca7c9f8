"""A real PostgreSQL database for the tests of the database backend: one per test run, created
on the machine's server (``LAMINA_TEST_DATABASE_URL``, default the local server's ``postgres``
database over TCP with trust auth, as on the development and CI machines), migrated with the
project's own Alembic revisions, and dropped at the end.

Each test gets its own store key (:func:`unique_store`), so tests share the database without
seeing each other's rows."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from adapters_store.database import libpq_url, migrate

ADMIN_URL = os.environ.get("LAMINA_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def scratch_database() -> Iterator[str]:
    """Create a fresh database, migrate it, yield its URL, drop it afterwards."""
    name = f"lamina_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(libpq_url(ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def unique_store() -> str:
    """A store key no other test uses."""
    return f"test-store-{uuid.uuid4().hex[:12]}"
