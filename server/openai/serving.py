"""Completions and chat completions: the service behind ``/v1/completions`` and
``/v1/chat/completions`` (and vLLM's ``/tokenize`` and ``/detokenize``), built once at start-up
and kept on ``app.state``; the router only translates to HTTP.

The two endpoints share one path, split by job: :mod:`server.openai.preparing` checks a
request and renders its prompts and sampling parameters (every refusal, before the engine),
:mod:`server.openai.running` runs them on the engine as one stream of deltas, and the writers
of :mod:`server.openai.formats` turn deltas into choices. This module holds what ties them to
a served version: the version lease, the fingerprint, the whole answer, the stream of
server-sent events with its in-band errors, and the log line and counter of each answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from server.engine import Engine
from server.errors import APIError
from server.metrics import LaminaMetrics
from server.openai.formats import ChatFormat, Choice, CompletionFormat, Format
from server.openai.preparing import Prepared, RequestPreparer, refusal
from server.openai.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    _new_id,
)
from server.openai.routing import ContinualRouter
from server.openai.running import run_pieces
from server.settings import ServerSettings
from server.swap.registry import CONTINUAL, ModelRegistry, Route
from trainer.contract.logs import set_log_context

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["CompletionService", "Prepared"]


class CompletionService:
    """The logic behind ``/v1/completions`` and ``/v1/chat/completions``."""

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        registry: ModelRegistry,
        tokenizer: PreTrainedTokenizerBase,
        metrics: LaminaMetrics | None = None,
        router: ContinualRouter | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics or LaminaMetrics()
        self.preparer = RequestPreparer(settings, registry, tokenizer)
        self.router = router or ContinualRouter(
            settings.continual_routing, registry.base_name, settings.model, tokenizer
        )

    def prepare(self, request: AnyRequest) -> Prepared:
        """Check ``request`` and render it into prompts and sampling parameters; every refusal
        is an ``APIError`` naming the field, raised before anything reaches the engine (and
        while it still loads: a bad request is a 400 then too, a good one a 503)."""
        return self.preparer.prepare(request)

    def model_name(self, request: AnyRequest) -> str:
        """``model`` as sent; like vLLM, a request without one asks for the base model."""
        return self.preparer.model_name(request)

    def served_name(self, request: AnyRequest) -> str:
        """The name whose route answers: ``model`` itself, or for ``continual`` what its router
        picks for this prompt (the merge, a task's model or the base; ``system_fingerprint`` shows it)."""
        name = self.model_name(request)
        served = self.router.served_name(request, name)
        if name == CONTINUAL:  # the only name a router answers with another
            self.metrics.continual_routes.labels(to=_route_label(served, self.registry)).inc()
        return served

    def _require_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(
                503, "The engine is still loading; retry when GET /ready is 200.", type="server_error"
            )

    def _check_with_engine(self, request: AnyRequest, params: SamplingParams) -> None:
        """vLLM's own checks of the parameters against the model, before a stream starts."""
        from vllm.exceptions import VLLMClientError

        try:
            self.engine.check(params)
        except (VLLMClientError, ValueError) as error:
            raise refusal(error, request) from error

    # ----------------------------------------------------------------- tokenizer endpoints

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """vLLM's ``POST /tokenize``: a prompt, or ``messages`` through the chat template, as the
        token ids the engine would see (every served model shares the base's tokenizer; an
        unknown ``model`` is a 404). ``vllm bench serve`` uses it to align its prompts."""
        if request.model is not None:
            self.registry.resolve(request.model)
        encode = self.preparer.encode
        if isinstance(request, TokenizeChatRequest):
            ids = encode(self.preparer.chat.render(request), request.add_special_tokens)
        else:
            ids = encode(request.prompt, request.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.settings.max_model_len, tokens=ids, token_strs=strs
        )

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's ``POST /detokenize``: token ids back to text (ids outside the vocabulary: 400)."""
        if request.model is not None:
            self.registry.resolve(request.model)
        vocabulary = len(self.tokenizer)
        outside = [i for i in request.tokens if i >= vocabulary]
        if outside:
            raise APIError(
                400,
                f"tokens holds ids outside the vocabulary of {vocabulary}: {outside[:5]}.",
                param="tokens",
            )
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))

    # ----------------------------------------------------------------- answering

    # ----------------------------------------------------------------- running requests

    def fingerprint(self, route: Route) -> str:
        """OpenAI's ``system_fingerprint``: the engine adapter version that serves the request
        (``name@v3``, ``continual@m7``), the merge written into the weights (weights serving),
        or the base model's name. A request leases its route once, so every chunk of one answer
        carries the same value; clients use it to see which version answered and that no answer
        mixed versions across a hot-swap."""
        if route.adapter is not None:
            return route.adapter.name
        return route.in_weights or self.registry.base_name

    def _format(self, request: AnyRequest, prepared: Prepared) -> Format:
        if isinstance(request, ChatCompletionRequest):
            return ChatFormat(self, request, prepared)
        return CompletionFormat(self, request, prepared)

    async def answer(self, request: AnyRequest) -> CompletionResponse | ChatCompletionResponse:
        """The whole answer at once."""
        prepared = self.prepare(request)
        self._require_ready()
        self._check_with_engine(request, prepared.params)
        form = self._format(request, prepared)
        response_id, n = _new_id(form.id_prefix), request.n or 1
        choices: dict[int, Choice] = {}
        async with self.registry.request(self.served_name(request)) as route:
            set_log_context(model=self.model_name(request), version=self.fingerprint(route))
            async for piece in run_pieces(self.engine, route, prepared, n, response_id, request.cache_salt):
                choices.setdefault(piece.index, form.new_choice(piece.index)).add(piece)
        usage = _usage(prepared.prompts, sum(len(c.token_ids) for c in choices.values()))
        fingerprint = self.fingerprint(route)
        self._log_answer(request, fingerprint, usage)
        return form.answer(
            response_id, [form.choice(i, choices[i]) for i in sorted(choices)], usage, fingerprint
        )

    def stream(self, request: AnyRequest) -> AsyncIterator[str]:
        """The answer as server-sent events. Refusals raise here, before the 200 is sent; an
        error after it goes into the stream as an ``{"error": ...}`` event before ``[DONE]``,
        as vLLM's server does."""
        prepared = self.prepare(request)
        self._require_ready()
        self._check_with_engine(request, prepared.params)
        form = self._format(request, prepared)
        response_id, created, n = _new_id(form.id_prefix), int(time.time()), request.n or 1
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            completion_tokens = 0
            try:
                async with self.registry.request(self.served_name(request)) as route:
                    fingerprint = self.fingerprint(route)
                    set_log_context(model=self.model_name(request), version=fingerprint)

                    def event(choices: list[Any], usage: Usage | None = None) -> str:
                        chunk = form.chunk(response_id, created, choices, usage, fingerprint)
                        return f"data: {json.dumps(chunk)}\n\n"

                    indices = range(len(prepared.prompts) * n)
                    choices = {i: form.new_choice(i) for i in indices}
                    for i in indices:
                        opening = form.opening(i)
                        if opening is not None:
                            yield event([opening])
                    async for piece in run_pieces(
                        self.engine, route, prepared, n, response_id, request.cache_salt
                    ):
                        completion_tokens += len(piece.token_ids)
                        delta = form.delta(choices[piece.index], piece)
                        if delta is not None:
                            yield event([delta])
                    usage = _usage(prepared.prompts, completion_tokens)
                    self._log_answer(request, fingerprint, usage)
                    if include_usage:
                        yield event([], usage)
            except Exception as error:  # the 200 is sent: the error goes in-band
                if not isinstance(error, APIError):
                    log.exception("error while streaming an answer")
                    error = APIError(500, "internal server error", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"

        return events()

    def _log_answer(self, request: AnyRequest, fingerprint: str, usage: Usage) -> None:
        """Log and count an answered request (the version is the answer's fingerprint)."""
        kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
        self.metrics.requests.labels(endpoint=kind, model=self.model_name(request), version=fingerprint).inc()
        log.info(
            "%s model=%s served_by=%s prompt_tokens=%d completion_tokens=%d",
            kind,
            self.model_name(request),
            fingerprint,
            usage.prompt_tokens,
            usage.completion_tokens,
        )


def _route_label(served: str, registry: ModelRegistry) -> str:
    """``base``, ``merge`` or ``task``: what a ``continual`` request was answered by."""
    if served == registry.base_name:
        return "base"
    return "merge" if served == CONTINUAL else "task"


def _usage(prompts: list[list[int]], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
