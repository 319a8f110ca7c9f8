"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers translate every failure the server expects into a 4xx naming the offending field;
services raise ``APIError`` instead of building responses themselves.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.request_id import HEADER, current_request_id
from server.swap.registry import ModelNotFound

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error the client can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content=error.body())


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> str | None:
    """``("body", "messages", 0, "ChatCompletionUserMessageParam", "role")`` -> ``"messages.0.role"``:
    pydantic puts the union member's type (``str``, ``list[str]``, a class name) into the
    location; fields are snake_case names and list indices."""
    parts = [
        str(p) for p in loc if isinstance(p, int) or (_FIELD.fullmatch(str(p)) and str(p) not in _TYPE_NAMES)
    ]
    parts = [p for p in parts if p not in ("body", "query", "path")]
    return ".".join(parts) or None


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _field_path(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(APIError(400, message, param=param, code="invalid_value"))


async def _on_engine_client_error(_: Request, exc: Exception) -> JSONResponse:
    """vLLM's ``VLLMClientError`` (its request validators raise these; they name the field)."""
    return error_response(
        APIError(400, str(exc), param=getattr(exc, "parameter", None), code="invalid_value")
    )


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
    return error_response(APIError(404, str(exc), param="model", code="model_not_found"))


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(exc.status_code, str(exc.detail), type=kind))


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    response = error_response(APIError(500, "internal server error", type="server_error"))
    # Starlette answers these outside every middleware, the request id's included
    request_id = current_request_id()
    if request_id is not None:
        response.headers[HEADER] = request_id
    return response


async def _on_database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    """The store's database (LAMINA_DATABASE_URL) is restarting or unreachable: nothing was
    changed, and the same request succeeds once it is back, so 503 rather than a server error."""
    log.warning("the store's database is unreachable: %s", exc)
    response = error_response(
        APIError(503, "the store's database is unreachable; retry in a few seconds", type="server_error")
    )
    request_id = current_request_id()
    if request_id is not None:
        response.headers[HEADER] = request_id
    return response


def install_error_handlers(app: FastAPI) -> None:
    import psycopg
    from vllm.exceptions import VLLMClientError  # the OpenAI requests are vLLM's models

    app.add_exception_handler(psycopg.OperationalError, _on_database_unavailable)

    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(VLLMClientError, _on_engine_client_error)
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(ModelNotFound, _on_model_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
