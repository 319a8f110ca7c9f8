"""Where the fine-tuning API keeps its uploaded files, progress points and job records, as the
settings choose: files under the store's directory, or rows in ``LAMINA_DATABASE_URL`` so that
servers on several hosts share them (as ``trainer.contract.backends`` chooses for the ledger and
the job board)."""

from __future__ import annotations

from typing import Any

from trainer.contract.backends import migrated
from trainer.contract.settings import LaminaSettings


def finetuning_backends(settings: LaminaSettings) -> dict[str, Any]:
    """Keyword arguments ``files``, ``progress`` and ``records`` for :class:`FineTuningService`:
    database ones when ``settings.database_url`` is set, else none (the service's files under
    ``store_dir``)."""
    if not settings.database_url:
        return {}
    from server.finetuning.events_database import DatabaseProgressLog
    from server.finetuning.files_database import DatabaseFileStore
    from server.finetuning.records_database import DatabaseFineTuneRecords

    url = migrated(settings.database_url)
    return {
        "files": DatabaseFileStore(url, settings.store_location),
        "progress": DatabaseProgressLog(url, settings.store_location),
        "records": DatabaseFineTuneRecords(url, settings.store_location),
    }
