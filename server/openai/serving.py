"""Completions and chat completions: turn validated requests into vLLM requests and vLLM
outputs into OpenAI responses or server-sent-event chunks.

Built once at start-up and kept on ``app.state``; the router only translates to HTTP.
Prompts are tokenized here (not in vLLM) so that context-length errors name the field
before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.engine import Engine
from server.errors import APIError
from server.models import ModelRegistry, Route
from server.openai.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    Usage,
    _new_id,
)
from server.settings import ServerSettings
from trainer.chat import DEFAULT_CHAT_TEMPLATE  # training renders chat examples with it too

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams

DEFAULT_COMPLETION_TOKENS = 16


@dataclass(frozen=True)
class Piece:
    """One streamed delta for one choice."""

    index: int
    text: str
    finish_reason: str | None
    n_tokens: int


class CompletionService:
    """The logic behind ``/v1/completions`` and ``/v1/chat/completions``."""

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        registry: ModelRegistry,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    # ----------------------------------------------------------------- validation helpers

    def _require_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(
                503, "The engine is still loading; retry when GET /ready is 200.", type="server_error"
            )

    def _encode(self, text: str, param: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) >= self.settings.max_model_len:
            raise APIError(
                400,
                f"{param} is {len(ids)} tokens; this model's context is {self.settings.max_model_len} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return list(ids)

    def _max_tokens(self, requested: int | None, prompt_lens: Sequence[int], default: int | None) -> int:
        room = self.settings.max_model_len - max(prompt_lens)
        if requested is None:
            return min(default, room) if default is not None else room
        if requested > room:
            raise APIError(
                400,
                f"max_tokens={requested} plus the prompt ({max(prompt_lens)} tokens) exceeds the "
                f"context of {self.settings.max_model_len} tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if requested > self.settings.max_tokens_limit:
            raise APIError(
                400, f"max_tokens may be at most {self.settings.max_tokens_limit}.", param="max_tokens"
            )
        return requested

    def _sampling_params(self, request: SamplingFields, max_tokens: int, stream: bool) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        # vLLM refuses n > 1 with greedy sampling; OpenAI allows it. _pieces runs such a
        # request as n single-sample copies (identical, as greedy decoding is deterministic).
        n = 1 if request.temperature == 0 else request.n
        if request.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens}).",
                param="min_tokens",
            )
        try:
            return SamplingParams(
                n=n,
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=max_tokens,
                stop=request.stop,
                seed=request.seed,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty,
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMValidationError as error:
            raise APIError(400, str(error), param=getattr(error, "parameter", None)) from error

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

    async def _pieces(
        self, route: Route, prompts: list[list[int]], params: SamplingParams, n: int, request_id: str
    ) -> AsyncIterator[Piece]:
        """Run every prompt as vLLM requests giving ``n`` samples each and yield their deltas
        as they arrive; choice index = prompt index · n + sample index."""
        from vllm.inputs import TokensPrompt

        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        copies = n // params.n  # > 1 only for greedy requests, see _sampling_params

        async def pump(first_index: int, token_ids: list[int], vllm_request_id: str) -> None:
            try:
                prompt = TokensPrompt(prompt_token_ids=token_ids)
                stream = self.engine.generate(prompt, params, vllm_request_id, route.adapter)  # type: ignore[arg-type]
                async for output in stream:
                    for sample in output.outputs:
                        piece = Piece(
                            first_index + sample.index,
                            sample.text,
                            sample.finish_reason,
                            len(sample.token_ids),
                        )
                        await queue.put(piece)
                await queue.put(None)
            except BaseException as exc:  # forwarded to the consumer, which re-raises
                await queue.put(exc)

        tasks = [
            asyncio.create_task(pump(i * n + copy, ids, f"{request_id}-{i}-{copy}"))
            for i, ids in enumerate(prompts)
            for copy in range(copies)
        ]
        try:
            finished = 0
            while finished < len(tasks):
                item = await queue.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(
        self, route: Route, prompts: list[list[int]], params: SamplingParams, n: int, request_id: str
    ) -> tuple[dict[int, Piece], Usage]:
        texts: dict[int, str] = {}
        reasons: dict[int, str | None] = {}
        counts: dict[int, int] = {}
        async for piece in self._pieces(route, prompts, params, n, request_id):
            texts[piece.index] = texts.get(piece.index, "") + piece.text
            reasons[piece.index] = piece.finish_reason
            counts[piece.index] = counts.get(piece.index, 0) + piece.n_tokens
        pieces = {i: Piece(i, texts[i], reasons[i], counts[i]) for i in sorted(texts)}
        return pieces, _usage(prompts, sum(counts.values()))

    # ----------------------------------------------------------------- completions

    def _prepare_completion(self, request: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
        self.registry.resolve(request.model)  # 404 before any work
        self._require_ready()
        prompts = [self._encode(p, "prompt") for p in request.prompts()]
        max_tokens = self._max_tokens(
            request.max_tokens, [len(p) for p in prompts], DEFAULT_COMPLETION_TOKENS
        )
        return prompts, self._sampling_params(request, max_tokens, request.stream)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        prompts, params = self._prepare_completion(request)
        response_id = _new_id("cmpl")
        with self.registry.lease(request.model) as route:
            pieces, usage = await self._collect(route, prompts, params, request.n, response_id)
        prefix = request.prompts()
        choices = [
            CompletionChoice(
                index=i,
                text=(prefix[i // request.n] if request.echo else "") + piece.text,
                finish_reason=_finish(piece.finish_reason),
            )
            for i, piece in pieces.items()
        ]
        return CompletionResponse(
            id=response_id,
            model=request.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.fingerprint(route),
        )

    def stream_completion(self, request: CompletionRequest) -> AsyncIterator[str]:
        prompts, params = self._prepare_completion(request)
        response_id, created = _new_id("cmpl"), int(time.time())

        fingerprint: str | None = None  # set once the request holds its route

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": request.model,
                "system_fingerprint": fingerprint,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage.model_dump()
            return body

        async def events() -> AsyncIterator[str]:
            nonlocal fingerprint
            completion_tokens = 0
            with self.registry.lease(request.model) as route:
                fingerprint = self.fingerprint(route)
                if request.echo:
                    for i in range(len(prompts) * request.n):
                        text = request.prompts()[i // request.n]
                        yield _sse(
                            chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
                        )
                async for piece in self._pieces(route, prompts, params, request.n, response_id):
                    completion_tokens += piece.n_tokens
                    if not piece.text and piece.finish_reason is None:
                        continue
                    choice = {
                        "index": piece.index,
                        "text": piece.text,
                        "logprobs": None,
                        "finish_reason": _finish(piece.finish_reason),
                    }
                    yield _sse(chunk([choice]))
            if request.stream_options and request.stream_options.include_usage:
                yield _sse(chunk([], _usage(prompts, completion_tokens)))
            yield "data: [DONE]\n\n"

        return events()

    # ----------------------------------------------------------------- chat completions

    def _prepare_chat(self, request: ChatCompletionRequest) -> tuple[list[list[int]], SamplingParams]:
        self.registry.resolve(request.model)
        self._require_ready()
        messages = [m.as_template_input() for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = self._encode(str(text), "messages")
        requested = request.max_completion_tokens or request.max_tokens
        if request.max_completion_tokens is not None and request.max_tokens is None:
            param_name = "max_completion_tokens"
        else:
            param_name = "max_tokens"
        try:
            max_tokens = self._max_tokens(requested, [len(prompt)], None)
        except APIError as error:
            error.param = param_name
            raise
        return [prompt], self._sampling_params(request, max_tokens, request.stream)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        prompts, params = self._prepare_chat(request)
        response_id = _new_id("chatcmpl")
        with self.registry.lease(request.model) as route:
            pieces, usage = await self._collect(route, prompts, params, request.n, response_id)
        choices = [
            ChatChoice(
                index=i,
                message=ChatChoiceMessage(content=piece.text),
                finish_reason=_finish(piece.finish_reason),
            )
            for i, piece in pieces.items()
        ]
        return ChatCompletionResponse(
            id=response_id,
            model=request.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.fingerprint(route),
        )

    def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        prompts, params = self._prepare_chat(request)
        response_id, created = _new_id("chatcmpl"), int(time.time())

        fingerprint: str | None = None  # set once the request holds its route

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
            body = ChatCompletionChunk(
                id=response_id,
                created=created,
                model=request.model,
                system_fingerprint=fingerprint,
                choices=choices,
                usage=usage,
            )
            return body.model_dump()

        async def events() -> AsyncIterator[str]:
            nonlocal fingerprint
            completion_tokens = 0
            with self.registry.lease(request.model) as route:
                fingerprint = self.fingerprint(route)
                for i in range(request.n):
                    yield _sse(
                        chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                    )
                async for piece in self._pieces(route, prompts, params, request.n, response_id):
                    completion_tokens += piece.n_tokens
                    if not piece.text and piece.finish_reason is None:
                        continue
                    delta = ChatDelta(content=piece.text)
                    choice = ChatChunkChoice(
                        index=piece.index, delta=delta, finish_reason=_finish(piece.finish_reason)
                    )
                    yield _sse(chunk([choice]))
            if request.stream_options and request.stream_options.include_usage:
                yield _sse(chunk([], _usage(prompts, completion_tokens)))
            yield "data: [DONE]\n\n"

        return events()


def _finish(reason: str | None) -> str | None:
    """vLLM says "abort" for cancelled requests; OpenAI clients only know stop/length."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def _usage(prompts: list[list[int]], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
