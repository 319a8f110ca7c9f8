"""How completions and chat completions write what the engine produced: choices, whole
answers, stream chunks and log-probabilities (``text`` and legacy logprobs for completions;
``message`` / ``delta``, chat logprobs and forced tool calls for chat). The serving path in
:mod:`server.openai.serving` is shared; only these writers differ between the endpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from server.openai.protocol import (
    AnyRequest,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.logprobs import Logprob

    from server.openai.preparing import Prepared

LOGPROB_FLOOR = -9999.0  # what OpenAI sends for a log-probability of -inf


class Service(Protocol):
    """What a format reads of the serving path (:class:`server.openai.serving.CompletionService`):
    the name a request is answered under and the tokenizer that decodes token ids. Spelled out
    here because the serving path imports the formats, so they cannot import it back."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def model_name(self, request: AnyRequest) -> str: ...


@dataclass(frozen=True)
class Piece:
    """One delta of one choice, as the engine produced it."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] | None
    finish_reason: str | None


@dataclass
class Choice:
    """One choice of an answer being collected or streamed."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    text_offset: int = 0  # where the next token starts in the choice's text (completion logprobs)

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.token_ids += piece.token_ids
        self.logprobs += piece.logprobs or []
        self.finish_reason = piece.finish_reason or self.finish_reason


def _tool_calls(request: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    """A forced tool call's output as OpenAI tool calls; None when it is not valid JSON (the
    answer ran out of tokens), so the text is answered as content instead."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if request.tool_choice == "required":
        if not isinstance(value, list):
            return None
        return [
            ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["parameters"])))
            for call in value
            if isinstance(call, dict) and "name" in call and "parameters" in call
        ]
    name = request.tool_choice.function.name  # type: ignore[union-attr]
    return [ToolCall(function=FunctionCall(name=name, arguments=text))]


class Format:
    """How one endpoint writes choices, answers and stream chunks."""

    id_prefix: str
    answer_type: type[CompletionResponse | ChatCompletionResponse]

    def __init__(self, service: Service, request: Any, prepared: Prepared) -> None:
        self.service, self.request, self.prepared = service, request, prepared
        self.model = service.model_name(request)
        self.as_token_ids = bool(request.return_tokens_as_token_ids)

    def new_choice(self, index: int) -> Choice:
        return Choice()

    def opening(self, index: int) -> Any | None:
        """What a stream sends for choice ``index`` before any token."""
        return None

    def choice(self, index: int, state: Choice) -> Any:
        raise NotImplementedError

    def delta(self, state: Choice, piece: Piece) -> Any | None:
        raise NotImplementedError

    def answer(
        self, response_id: str, choices: list[Any], usage: Usage, fingerprint: str
    ) -> CompletionResponse | ChatCompletionResponse:
        return self.answer_type(
            id=response_id, model=self.model, choices=choices, usage=usage, system_fingerprint=fingerprint
        )

    def chunk(
        self, response_id: str, created: int, choices: list[Any], usage: Usage | None, fingerprint: str
    ) -> dict[str, Any]:
        raise NotImplementedError

    # logprobs: both endpoints rank the engine's alternatives the same way

    def token(self, token_id: int, logprob: Logprob | None) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return str(self.service.tokenizer.decode([token_id]))

    @staticmethod
    def ranked(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
        best = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)
        return best if k < 0 else best[:k]


def _floor(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class CompletionFormat(Format):
    id_prefix = "cmpl"
    answer_type = CompletionResponse
    request: CompletionRequest

    def prompt_text(self, index: int) -> str:
        """The prompt of choice ``index`` as echoed: as sent, or decoded from token ids."""
        prompt = self.prepared.prompts[index // (self.request.n or 1)]
        batch = self.request.prompt
        if isinstance(batch, str):
            return batch
        if isinstance(batch, list) and batch and isinstance(batch[0], str):
            return str(batch[index // (self.request.n or 1)])
        return str(self.service.tokenizer.decode(prompt))

    def new_choice(self, index: int) -> Choice:
        state = Choice()
        if self.request.echo:
            state.text_offset = len(self.prompt_text(index))
        return state

    def logprobs(self, state: Choice, token_ids: list[int], positions: list[Any]) -> CompletionLogprobs:
        """OpenAI's legacy logprobs for ``token_ids``, continuing ``state``'s text offsets."""
        k = self.request.logprobs or 0
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, position in zip(token_ids, positions, strict=False):
            sampled = position.get(token_id) if position else None
            token = self.token(token_id, sampled)
            out.tokens.append(token)
            out.token_logprobs.append(_floor(sampled.logprob) if sampled else None)
            if position is None:
                out.top_logprobs.append(None)
            else:
                top = {self.token(t, lp): _floor(lp.logprob) for t, lp in self.ranked(position, k)}
                if sampled is not None:
                    top.setdefault(token, _floor(sampled.logprob))  # OpenAI: always the sampled token too
                out.top_logprobs.append(top)
            out.text_offset.append(state.text_offset)
            state.text_offset += len(token)
        return out

    def choice(self, index: int, state: Choice) -> CompletionChoice:
        prefix = self.prompt_text(index) if self.request.echo else ""
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self.logprobs(state, state.token_ids, state.logprobs)
        return CompletionChoice(
            index=index,
            text=prefix + state.text,
            logprobs=logprobs,
            finish_reason=_finish(state.finish_reason),
        )

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.request.echo:
            return None
        return CompletionChoice(index=index, text=self.prompt_text(index), finish_reason=None).model_dump()

    def delta(self, state: Choice, piece: Piece) -> dict[str, Any] | None:
        if not piece.text and piece.finish_reason is None and not piece.token_ids:
            return None
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self.logprobs(state, piece.token_ids, piece.logprobs or [])
        choice = CompletionChoice(
            index=piece.index, text=piece.text, logprobs=logprobs, finish_reason=_finish(piece.finish_reason)
        )
        return choice.model_dump()

    def chunk(
        self, response_id: str, created: int, choices: list[Any], usage: Usage | None, fingerprint: str
    ) -> dict[str, Any]:
        body = CompletionResponse(
            id=response_id, created=created, model=self.model, choices=[], system_fingerprint=fingerprint
        ).model_dump(exclude={"usage"})
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage.model_dump()
        return body


class ChatFormat(Format):
    id_prefix = "chatcmpl"
    answer_type = ChatCompletionResponse
    request: ChatCompletionRequest

    def logprobs(self, token_ids: list[int], positions: list[Any]) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        k = self.request.top_logprobs or 0
        content = []
        for token_id, position in zip(token_ids, positions, strict=False):
            sampled = position.get(token_id) if position else None
            token = self.token(token_id, sampled)
            tops = [
                TopLogprob(token=(t := self.token(i, lp)), logprob=_floor(lp.logprob), bytes=list(t.encode()))
                for i, lp in (self.ranked(position, k) if position else [])
            ]
            logprob = _floor(sampled.logprob) if sampled else LOGPROB_FLOOR
            content.append(
                TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=tops)
            )
        return ChatLogprobs(content=content)

    def choice(self, index: int, state: Choice) -> ChatChoice:
        calls = _tool_calls(self.request, state.text) if self.prepared.tool_schema is not None else None
        message = (
            ChatChoiceMessage(content=None, tool_calls=calls)
            if calls
            else ChatChoiceMessage(content=state.text)
        )
        return ChatChoice(
            index=index,
            message=message,
            logprobs=self.logprobs(state.token_ids, state.logprobs),
            finish_reason="tool_calls" if calls else _finish(state.finish_reason),
        )

    def opening(self, index: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))

    def delta(self, state: Choice, piece: Piece) -> ChatChunkChoice | None:
        if self.prepared.tool_schema is not None:
            # A forced tool call is sent whole once it is complete: its arguments are only
            # known to be a call (not text) once they parse.
            state.add(piece)
            if piece.finish_reason is None:
                return None
            final = self.choice(piece.index, state)
            calls = [
                ToolCallDelta(index=i, **call.model_dump())
                for i, call in enumerate(final.message.tool_calls or [])
            ]
            delta = ChatDelta(content=final.message.content, tool_calls=calls or None)
            return ChatChunkChoice(
                index=piece.index, delta=delta, logprobs=final.logprobs, finish_reason=final.finish_reason
            )
        if not piece.text and piece.finish_reason is None and not piece.token_ids:
            return None
        return ChatChunkChoice(
            index=piece.index,
            delta=ChatDelta(content=piece.text),
            logprobs=self.logprobs(piece.token_ids, piece.logprobs or []),
            finish_reason=_finish(piece.finish_reason),
        )

    def chunk(
        self, response_id: str, created: int, choices: list[Any], usage: Usage | None, fingerprint: str
    ) -> dict[str, Any]:
        body = ChatCompletionChunk(
            id=response_id,
            created=created,
            model=self.model,
            system_fingerprint=fingerprint,
            choices=choices,
            usage=usage,
        )
        return body.model_dump()


def _finish(reason: str | None) -> str | None:
    """vLLM says "abort" for cancelled requests; OpenAI clients only know stop/length."""
    return None if reason is None else ("length" if reason == "length" else "stop")
