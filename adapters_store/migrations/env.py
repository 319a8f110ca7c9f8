"""Alembic's entry point for Lamina's schema; run through :func:`adapters_store.database.migrate`
(or ``alembic`` with ``script_location`` pointing here)."""

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
