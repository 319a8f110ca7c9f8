"""PostgreSQL for the store's metadata, when ``LAMINA_DATABASE_URL`` is set: one place that
knows how to connect and how to bring the schema up to date.

Why a connection per operation, not a pool: every statement Lamina sends is a short transaction
(a ledger append, a job update, a poll of the last ``seq``), a few per second at most, and a
fresh connection on a LAN costs about a millisecond. Nothing then survives a database restart
half-open: the next operation simply reconnects.

The schema is Alembic's (``adapters_store/migrations``); :func:`migrate` runs on every server and
worker start, under an advisory lock, so processes starting together upgrade it once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# What a caller sees while the database (or the network to it) is away: worth retrying, unlike a
# refused statement. A worker rides out a restart shorter than its lease with these.
UNAVAILABLE: tuple[type[Exception], ...] = (OSError, psycopg.OperationalError)
_MIGRATION_LOCK = 0x4C414D494E41  # "LAMINA": the advisory lock every migrating process takes


def libpq_url(url: str) -> str:
    """The URL as psycopg takes it: SQLAlchemy's driver suffix (``postgresql+psycopg://``) removed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r} (expected postgresql://user@host:port/database)")
    return f"postgresql://{rest}"


def sqlalchemy_url(url: str) -> str:
    """The URL as Alembic's SQLAlchemy engine takes it, with the psycopg (3) driver."""
    return "postgresql+psycopg://" + libpq_url(url).partition("://")[2]


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection]:
    """One connection, closed on exit; statements run in a transaction committed on a clean
    exit and rolled back on an exception."""
    with psycopg.connect(libpq_url(url), connect_timeout=10) as connection:
        yield connection


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for a named lock (e.g. one store's writer lock)."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migrate(url: str) -> None:
    """Bring the database's schema to the newest revision (a no-op when it is there already)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    with connect(url) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            command.upgrade(config, "head")
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
