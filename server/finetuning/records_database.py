"""The OpenAI request of each fine-tuning job, in PostgreSQL (``lamina_finetuning_jobs``), for
servers on several hosts that share a database but no directory: a job created on one server
reads back on any with its training file, suffix, metadata and requested hyperparameters.

Job ids are checked (:func:`trainer.contract.board.checked_job_id`) before any query, as the file
records check them before building a path. The schema is ``adapters_store/migrations``'.
"""

from __future__ import annotations

from collections.abc import Iterable

from psycopg.types.json import Jsonb
from pydantic import ValidationError

from adapters_store.database import connect
from server.finetuning.protocol import FineTuneRecord
from server.finetuning.service import well_formed_job_id
from trainer.contract.board import checked_job_id

__all__ = ["DatabaseFineTuneRecords"]


def _record(value: object) -> FineTuneRecord | None:
    try:
        return FineTuneRecord.model_validate(value)
    except ValidationError:  # not a record this server reads: as the file records, none
        return None


class DatabaseFineTuneRecords:
    """The job records of the store ``store`` in the database at ``url`` (a
    :class:`server.finetuning.service.FineTuneRecords`), one row per job."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store

    def put(self, record: FineTuneRecord) -> None:
        job_id = checked_job_id(record.job_id)
        with connect(self.url) as connection:
            connection.execute(
                "INSERT INTO lamina_finetuning_jobs (store, job_id, record) VALUES (%s, %s, %s) "
                "ON CONFLICT (store, job_id) DO UPDATE SET record = EXCLUDED.record",
                (self.store, job_id, Jsonb(record.model_dump(mode="json"))),
            )

    def get(self, job_id: str) -> FineTuneRecord | None:
        if not well_formed_job_id(job_id):
            return None
        with connect(self.url) as connection:
            row = connection.execute(
                "SELECT record FROM lamina_finetuning_jobs WHERE store = %s AND job_id = %s",
                (self.store, job_id),
            ).fetchone()
        return None if row is None else _record(row[0])

    def many(self, job_ids: Iterable[str]) -> dict[str, FineTuneRecord]:
        wanted = sorted({job_id for job_id in job_ids if well_formed_job_id(job_id)})
        if not wanted:
            return {}
        with connect(self.url) as connection:
            rows = connection.execute(
                "SELECT job_id, record FROM lamina_finetuning_jobs WHERE store = %s AND job_id = ANY(%s)",
                (self.store, wanted),
            ).fetchall()
        found = {job_id: _record(value) for job_id, value in rows}
        return {job_id: record for job_id, record in found.items() if record is not None}
