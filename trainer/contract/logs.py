"""One log format for the server and the worker: text for people, or one JSON object per line
(``LAMINA_LOG_FORMAT=json``) for a log pipeline.

Context travels on the records, not in the messages: ``server.request_id`` gives every record
a ``request_id``; :func:`log_context` adds ``job_id``, ``model`` and ``version`` for the code it
wraps (the worker's job, the server's request once it knows the served model). Both use
context variables, so tasks and threads started inside inherit what their parent knew.
Imports only the standard library: the API process configures logging with it too. Part of the
server↔trainer contract, so both processes log the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

CONTEXT_FIELDS = ("request_id", "job_id", "model", "version")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

_context: ContextVar[dict[str, str]] = ContextVar("lamina_log_context", default={})  # noqa: B039 - never mutated


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Records written inside carry these fields (None values are left out)."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_log_context(**fields: str | None) -> None:
    """Like :func:`log_context`, for the rest of the current context (a request's own task)."""
    _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


def _install_context_records() -> None:
    """Give every record the fields of the current :func:`log_context` (idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "lamina_log_context", False):
        return

    def with_context(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        for key, value in _context.get().items():
            if getattr(record, key, None) in (None, "-"):
                setattr(record, key, value)
        if not hasattr(record, "request_id"):  # the text format names it; "-": no request
            record.request_id = "-"
        return record

    with_context.lamina_log_context = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(with_context)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the context fields that are known
    (request_id, job_id, model, version), and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value not in (None, "", "-"):
                entry[key] = str(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """Point the root logger at stderr in ``log_format``, replacing its handlers (so calling it
    again once the settings are read switches the format). Uvicorn's and Celery's loggers
    propagate to the root, so they are written the same way."""
    _install_context_records()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def use_log_format(log_format: Literal["text", "json"]) -> None:
    """Switch to the settings' log format, keeping the level already chosen (``--verbose``). In
    JSON, vLLM and uvicorn log through the root logger too, instead of their own text handlers."""
    if log_format == "json":
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    configure_logging(log_format, logging.getLogger().level)
