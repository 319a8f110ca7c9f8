"""Which store backend the processes the integration tests start run on.

By default (``LAMINA_TEST_BACKEND`` unset or ``files``) every server and worker keeps its store in
its ``LAMINA_HOME``, as one host does. With ``LAMINA_TEST_BACKEND=database-s3`` the same tests run
on the multi-host layout instead: every server and worker a test starts gets ``LAMINA_DATABASE_URL``
(a scratch database created for the run) and a store in a bucket on moto's S3 server (started for the
run), named after the stack's ``LAMINA_STORE`` or ``LAMINA_HOME``, so the processes of one stack share
one store and stacks never share one. Tests that read or write a stack's store themselves go through
:func:`stack_store` and :func:`stack_ledger`, which open it wherever it is.

    LAMINA_TEST_BACKEND=database-s3 .venv/bin/python -m pytest tests/integration

The pytest process's own environment is left alone, so unit tests keep their explicit backends.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from contextlib import ExitStack
from functools import cache
from pathlib import Path
from typing import Any

from adapters_store.store import AdapterStore
from trainer.contract.board import JobBoard

BACKEND = os.environ.get("LAMINA_TEST_BACKEND", "files")
if BACKEND not in ("files", "database-s3"):
    raise RuntimeError(f"LAMINA_TEST_BACKEND={BACKEND!r}: expected files or database-s3")
MULTI_HOST = BACKEND == "database-s3"


@cache
def _services() -> tuple[str, Any]:
    """The run's scratch database and S3 server, started on first use, stopped at exit."""
    from bench.object_storage import s3_server
    from tests.support.database import scratch_database

    stack = ExitStack()
    atexit.register(stack.close)
    return stack.enter_context(scratch_database()), stack.enter_context(s3_server())


def _local_store(env: dict[str, str]) -> Path:
    """The store directory a stack ``env`` names on files: ``LAMINA_STORE``, else ``<home>/store``."""
    return Path(env.get("LAMINA_STORE") or Path(env["LAMINA_HOME"]) / "store")


def _store_url(env: dict[str, str]) -> str:
    """The bucket prefix of the stack ``env`` describes: one per store directory it would use."""
    local = str(_local_store(env))
    return f"s3://lamina-test/stack-{hashlib.sha256(local.encode()).hexdigest()[:16]}"


def stack_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a server or worker: unchanged on files, or pointed at the run's database and a
    bucket prefix of the stack's own (an env that names a database already is left as it is)."""
    if not MULTI_HOST or "LAMINA_DATABASE_URL" in env:
        return env
    from bench.object_storage import CREDENTIALS

    database_url, s3 = _services()
    return {
        **env,
        **CREDENTIALS,
        "LAMINA_DATABASE_URL": database_url,
        "LAMINA_STORE": _store_url(env),
        "LAMINA_S3_ENDPOINT_URL": s3.endpoint_url,
    }


def stack_store(env: dict[str, str], fingerprint: str, **options: Any) -> AdapterStore:
    """The store of the stack ``env`` describes, opened from this process (as a third host when
    the store is in a bucket: with a local copy of its own under the stack's home)."""
    if not MULTI_HOST:
        root = _local_store(env)
        return AdapterStore(root, fingerprint, **options)
    from adapters_store.blobs import ObjectStorage
    from adapters_store.ledger_database import DatabaseLedger

    database_url, s3 = _services()
    url = _store_url(env)
    return AdapterStore(
        Path(env["LAMINA_HOME"]) / "test-process-copy",
        fingerprint,
        ledger=DatabaseLedger(database_url, url),
        objects=ObjectStorage(url, s3.options),
        location=url,
        **options,
    )


def stack_ledger(env: dict[str, str]) -> list[dict[str, Any]]:
    """The stack's ledger entries, wherever they are kept."""
    if not MULTI_HOST:
        import json

        path = _local_store(env) / "ledger.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from adapters_store.ledger_database import DatabaseLedger

    database_url, _ = _services()
    return DatabaseLedger(database_url, _store_url(env)).read()


def stack_board(env: dict[str, str]) -> JobBoard:
    """The stack's job board, wherever it is kept."""
    if not MULTI_HOST:
        return JobBoard(_local_store(env))
    from trainer.contract.board_database import DatabaseJobRecords

    database_url, _ = _services()
    return JobBoard(records=DatabaseJobRecords(database_url, _store_url(env)))
