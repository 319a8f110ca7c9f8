"""HTTP routes of the OpenAI-compatible API: translate between HTTP and the services on
``app.state``; no logic lives here."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.openai.serving import CompletionService

router = APIRouter(prefix="/v1", tags=["openai"])
_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def _service(request: Request) -> CompletionService:
    return request.app.state.completions


def _event_stream(events) -> StreamingResponse:  # type: ignore[no-untyped-def]
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.registry
    cards = [ModelCard(id=r.name, created=r.created, kind=r.kind) for r in registry.routes()]
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse, responses=_ERRORS)
async def create_completion(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    service = _service(request)
    if body.stream:
        return _event_stream(service.stream_completion(body))
    return await service.complete(body)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    service = _service(request)
    if body.stream:
        return _event_stream(service.stream_chat(body))
    return await service.chat(body)
