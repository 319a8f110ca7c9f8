"""Request and response shapes of the OpenAI-compatible endpoints.

Requests are vLLM's own request models (``vllm.entrypoints.openai``), so Lamina accepts every
body vLLM's server accepts and, like it, ignores fields it does not know. What Lamina adds on
top (the model resolver, the version lease, the fields it refuses by name) lives in
``serving.py``. Responses are OpenAI's shapes, with ``system_fingerprint`` naming the adapter
version that answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as _VllmChatCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as _VllmCompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import (  # vLLM's /tokenize and /detokenize, as is
    DetokenizeRequest as DetokenizeRequest,
)
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse as DetokenizeResponse
from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest as TokenizeChatRequest
from vllm.entrypoints.serve.tokenize.protocol import (
    TokenizeCompletionRequest as TokenizeCompletionRequest,
)
from vllm.entrypoints.serve.tokenize.protocol import TokenizeResponse as TokenizeResponse


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _malformed_field(model: type[BaseModel], data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """vLLM's "before" validators read the raw body and crash (TypeError, ...) on some
    malformed ones (``"messages": null``); such a body is a 400 naming the malformed field."""
    from vllm.exceptions import VLLMValidationError

    try:
        return handler(data)
    except (TypeError, AttributeError, KeyError) as error:
        fields = data.items() if isinstance(data, dict) else []
        for name, value in fields:
            field = model.model_fields.get(name)
            if field is None or field.annotation is None:
                continue
            try:
                TypeAdapter(field.annotation).validate_python(value)
            except ValidationError:
                raise VLLMValidationError(f"{name} is malformed.", parameter=name) from error
        raise VLLMValidationError(f"the request is malformed: {error}") from error


class CompletionRequest(_VllmCompletionRequest):
    """vLLM's completion request, plus OpenAI's legacy ``best_of`` (vLLM ignores it; Lamina
    serves ``best_of`` equal to ``n`` and refuses the rest by name)."""

    best_of: int | None = Field(None, description="OpenAI legacy: samples to choose from; only best_of == n.")

    @model_validator(mode="wrap")
    @classmethod
    def _malformed_is_400(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _malformed_field(cls, data, handler)


class ChatCompletionRequest(_VllmChatCompletionRequest):
    """vLLM's chat completion request."""

    @model_validator(mode="wrap")
    @classmethod
    def _malformed_is_400(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _malformed_field(cls, data, handler)


AnyRequest = CompletionRequest | ChatCompletionRequest
TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"] | None


class _Answer(BaseModel):
    """What every answer and stream chunk carries besides its choices (each kind narrows
    ``id`` and ``object``; declared here so they come first, as in OpenAI's answers)."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None
    system_fingerprint: str | None = Field(
        None, description="The engine adapter version that served the request, or the base model's name."
    )


# ----------------------------------------------------------------------------- logprobs


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completion logprobs: per generated token its text, log-probability, the
    most likely alternatives (``logprobs`` of them, plus the sampled token) and its offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The top_logprobs most likely tokens here.")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


# ----------------------------------------------------------------------------- completions


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class CompletionResponse(_Answer):
    id: str = Field(default_factory=lambda: _new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# ----------------------------------------------------------------------------- chat


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_Answer):
    id: str = Field(default_factory=lambda: _new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ToolCallDelta(ToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Answer):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


# ----------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    """A served model, as vLLM describes one: ``root`` is what it is built from (the base
    model as configured, or the adapter version serving a task or the continual alias),
    ``parent`` the model it adapts (None for the base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    kind: str = Field(description="base | task | continual")
    exact: bool = Field(
        True,
        description="False when the engine serves this model only approximately, as a truncated SVD of "
        "its update (a rank above LAMINA_MAX_LORA_RANK, or a dense merge's correction).",
    )
    relative_error: float | None = Field(
        None, description="The approximation's relative Frobenius error; None when exact."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
