"""The progress points the server records per fine-tuning job, in PostgreSQL
(``lamina_progress_points``), for servers on several hosts that share a database but no
directory: every server then lists the points any of them saw. The schema is
``adapters_store/migrations``'.
"""

from __future__ import annotations

import time

from psycopg.types.json import Jsonb

from adapters_store.database import connect
from trainer.contract.jobs import Job

__all__ = ["DatabaseProgressLog"]


class DatabaseProgressLog:
    """Progress points seen per job of the store ``store`` in the database at ``url`` (a
    :class:`ProgressPoints`), one row per step, so that servers on every host add to one curve."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store

    def observe(self, job: Job) -> None:
        if job.progress is None:
            return
        point = {**job.progress.model_dump(), "at": int(time.time())}
        with connect(self.url) as connection:
            connection.execute(  # two servers may record one step: the first one's point stays
                "INSERT INTO lamina_progress_points (store, job_id, step, point) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store, job_id, step) DO NOTHING",
                (self.store, job.id, job.progress.step, Jsonb(point)),
            )

    def points(self, job_id: str) -> list[dict]:
        with connect(self.url) as connection:
            rows = connection.execute(
                "SELECT point FROM lamina_progress_points WHERE store = %s AND job_id = %s ORDER BY step",
                (self.store, job_id),
            ).fetchall()
        return [dict(row[0]) for row in rows]
