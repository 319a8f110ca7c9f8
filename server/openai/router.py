"""HTTP routes of the OpenAI-compatible API: translate between HTTP and the services on
``app.state``; no logic lives here."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.errors import ErrorResponse
from server.openai.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.openai.serving import CompletionService
from server.swap.registry import Route, RouteKind

router = APIRouter(prefix="/v1", tags=["openai"])
# vLLM's tokenizer endpoints, at the root as vLLM serves them (``vllm bench serve`` calls /tokenize)
tokenizer_router = APIRouter(tags=["openai"])
_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def _card(request: Request, route: Route) -> ModelCard:
    """``root``: the adapter version serving it, the merge written into the weights, or the
    base model as configured (``continual`` before any merge); ``parent``: the base, for all
    but the base itself."""
    settings = request.app.state.settings
    root = route.adapter.name if route.adapter else (route.in_weights or str(settings.model))
    parent = None if route.kind is RouteKind.base else request.app.state.registry.base_name
    return ModelCard(
        id=route.name,
        created=route.created,
        root=root,
        parent=parent,
        max_model_len=settings.max_model_len,
        kind=route.kind,
        exact=route.relative_error is None,
        relative_error=route.relative_error,
    )


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request, route) for route in request.app.state.registry.routes()])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One model's card; 404 in OpenAI's shape (``model_not_found``) for an id not served."""
    return _card(request, request.app.state.registry.resolve(model_id))


async def _answer(body: AnyRequest, request: Request):  # type: ignore[no-untyped-def]
    service: CompletionService = request.app.state.completions
    if body.stream:
        events = service.stream(body)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await service.answer(body)


@router.post("/completions", response_model=CompletionResponse, responses=_ERRORS)
async def create_completion(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return await _answer(body, request)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return await _answer(body, request)


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return request.app.state.completions.tokenize(body)


@tokenizer_router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return request.app.state.completions.detokenize(body)
