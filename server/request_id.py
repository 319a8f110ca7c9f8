"""Request ids: ``X-Request-Id`` taken from the request (a fresh one when absent or unusable),
echoed on the response and carried by every log record written while the request runs.

The id lives in a context variable, so tasks a request spawns (one per vLLM request) inherit
it; log records get it as ``record.request_id`` (``-`` outside any request) through the log
record factory, so any handler's format may name ``%(request_id)s``.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as HTTP headers carry it
_current: ContextVar[str | None] = ContextVar("lamina_request_id", default=None)


def current_request_id() -> str | None:
    return _current.get()


class RequestIdMiddleware:
    """Outermost middleware: every response it sees carries the request's id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if _USABLE.fullmatch(given) else uuid.uuid4().hex
        # Set, never reset: each request runs in its own task (its own context), and the error
        # handler that Starlette runs outside every middleware still reads it.
        _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def install_log_records() -> None:
    """Give every log record a ``request_id`` attribute (idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "lamina_request_id", False):
        return

    def with_request_id(*args, **kwargs) -> logging.LogRecord:  # type: ignore[no-untyped-def]
        record = factory(*args, **kwargs)
        record.request_id = _current.get() or "-"
        return record

    with_request_id.lamina_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(with_request_id)
