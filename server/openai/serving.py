"""Completions and chat completions: one path from a validated request to vLLM requests, and
from vLLM outputs to an OpenAI answer or a stream of server-sent events.

The two endpoints differ only in how a request becomes prompts (text or token ids; messages
through the chat template) and how a choice is written (``text`` and legacy logprobs;
``message`` / ``delta``, chat logprobs and tool calls): the writers of
:mod:`server.openai.formats`. Everything else (limits, sampling parameters through vLLM's own
``to_sampling_params``, the version lease, running the engine, usage, streaming and its
in-band errors) is shared, here.

Built once at start-up and kept on ``app.state``; the router only translates to HTTP.
Prompts are tokenized here (not in vLLM) so that context-length errors name the field
before anything reaches the engine, and a chat prompt is tokenized as training tokenizes it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NamedTuple

from server.engine import Engine
from server.errors import APIError
from server.metrics import LaminaMetrics
from server.models import ModelRegistry, Route
from server.openai.formats import ChatFormat, Choice, CompletionFormat, Format, Piece
from server.openai.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    _new_id,
)
from server.settings import ServerSettings
from trainer.chat import DEFAULT_CHAT_TEMPLATE  # training renders chat examples with it too
from trainer.logs import set_log_context

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n per prompt: this server's bound (each choice is a sequence in the batch)

# Fields of vLLM's requests that Lamina does not serve: a request that sets one is refused
# with a 400 naming it, never answered as if it had not been sent.
UNSERVED: dict[str, str] = {
    "use_beam_search": "beam search is not served; sample n choices instead",
    "prompt_embeds": "prompt embeddings are not served; send text or token ids",
    "prompt_logprobs": "prompt log-probabilities are not served",
    "logprob_token_ids": "log-probabilities of chosen token ids are not served; use logprobs",
    "return_token_ids": "token ids in answers are not served; use logprobs",
    "kv_transfer_params": "this server has no KV-transfer connector",
    "ec_transfer_params": "this server has no encoder-cache transfer connector",
    "priority": "the engine schedules requests first come, first served",
    "chat_template": "request-supplied chat templates are not trusted (vLLM's default too)",
}


def _is_set(name: str, value: object) -> bool:
    return bool(value) and not (name == "thinking_token_budget" and value == -1)


class Prepared(NamedTuple):
    """A request checked and rendered: prompts as token ids and the engine's sampling
    parameters (``n`` is 1 for greedy requests; their n choices run as copies)."""

    prompts: list[list[int]]
    params: SamplingParams
    tool_schema: dict[str, Any] | None = None  # chat with a forced tool call: the output's JSON schema


class CompletionService:
    """The logic behind ``/v1/completions`` and ``/v1/chat/completions``."""

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        registry: ModelRegistry,
        tokenizer: PreTrainedTokenizerBase,
        metrics: LaminaMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics or LaminaMetrics()
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        # Tools reach the model only through a template that renders them.
        self.template_renders_tools = "tools" in str(tokenizer.chat_template)
        # chat_template_kwargs are template variables; apply_chat_template's own arguments are not
        self._template_arguments = set(inspect.signature(tokenizer.apply_chat_template).parameters)

    # ----------------------------------------------------------------- checks

    def _require_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(
                503, "The engine is still loading; retry when GET /ready is 200.", type="server_error"
            )

    def _refuse_unserved(self, request: AnyRequest) -> None:
        for name, why in UNSERVED.items():
            if _is_set(name, getattr(request, name, None)):
                raise APIError(400, f"{name} is not supported: {why}.", param=name, code="unsupported")
        if _is_set("thinking_token_budget", request.thinking_token_budget):
            raise APIError(
                400,
                "thinking_token_budget is not supported: this server has no reasoning parser.",
                param="thinking_token_budget",
                code="unsupported",
            )
        n = request.n or 1
        if n > MAX_CHOICES:
            raise APIError(400, f"n may be at most {MAX_CHOICES}.", param="n")
        if isinstance(request, ChatCompletionRequest):
            if request.echo:
                raise APIError(400, "echo is not supported in chat completions.", param="echo")
            return
        if request.suffix:
            raise APIError(
                400,
                "suffix is not supported: the served model has no fill-in-the-middle prompt format.",
                param="suffix",
                code="unsupported",
            )
        if request.best_of is not None and request.best_of != n:
            raise APIError(
                400,
                f"best_of={request.best_of} is not supported: only best_of equal to n ({n}) is served.",
                param="best_of",
                code="unsupported",
            )
        if request.echo and request.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs is not supported: prompt log-probabilities are not served.",
                param="echo",
                code="unsupported",
            )

    def _check_length(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} must not be empty.", param=param)
        if len(ids) >= self.settings.max_model_len:
            raise APIError(
                400,
                f"{param} is {len(ids)} tokens; this model's context is {self.settings.max_model_len} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def _max_tokens(self, requested: int | None, prompts: list[list[int]], param: str) -> int:
        longest = max(len(p) for p in prompts)
        room = self.settings.max_model_len - longest
        if requested is None:
            return room
        if requested < 1:
            raise APIError(400, f"{param} must be at least 1, got {requested}.", param=param)
        if requested > room:
            raise APIError(
                400,
                f"{param}={requested} plus the prompt ({longest} tokens) exceeds the "
                f"context of {self.settings.max_model_len} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if requested > self.settings.max_tokens_limit:
            raise APIError(400, f"{param} may be at most {self.settings.max_tokens_limit}.", param=param)
        return requested

    # ----------------------------------------------------------------- prompts

    def _truncate(self, ids: list[int], request: AnyRequest) -> list[int]:
        keep = request.truncate_prompt_tokens
        if keep is None:
            return ids
        keep = self.settings.max_model_len - 1 if keep == -1 else keep
        return ids[:keep] if request.truncation_side == "right" else ids[len(ids) - keep :]

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """``prompt`` as token ids: a text, a list of texts, a list of token ids, or a list of those."""
        prompt = request.prompt
        if not isinstance(prompt, list) or not prompt:
            batch: list[str | list[int]] = [prompt] if isinstance(prompt, str) else []
        elif all(isinstance(item, int) for item in prompt):
            batch = [list(prompt)]  # type: ignore[arg-type]
        else:
            batch = list(prompt)  # type: ignore[arg-type]
        if not batch:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        vocabulary = len(self.tokenizer)
        prompts = []
        for item in batch:
            if isinstance(item, str):
                ids = self._encode(item, request.add_special_tokens)
            else:
                ids = list(item)
                outside = [i for i in ids if i >= vocabulary]
                if outside:
                    raise APIError(
                        400,
                        f"prompt holds token ids outside the vocabulary of {vocabulary}: {outside[:5]}.",
                        param="prompt",
                    )
            prompts.append(self._check_length(self._truncate(ids, request), "prompt"))
        return prompts

    def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """``messages`` through the chat template, tokenized as training tokenizes a chat prompt
        (special tokens added unless the request says otherwise)."""
        text = self._chat_text(request)
        special = request.add_special_tokens if "add_special_tokens" in request.model_fields_set else True
        return self._check_length(self._truncate(self._encode(text, special), request), "messages")

    def _chat_text(self, request: ChatCompletionRequest | TokenizeChatRequest) -> str:
        """``messages`` rendered by the chat template (a 400 naming ``messages`` if it refuses)."""
        from jinja2 import TemplateError

        if not request.messages:
            raise APIError(400, "messages must hold at least one message.", param="messages")
        conversation = [_template_message(i, m) for i, m in enumerate(request.messages)]
        variables = {
            k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in self._template_arguments
        }
        if request.tools and self.template_renders_tools:
            variables["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
        documents = getattr(request, "documents", None)
        if documents:
            variables["documents"] = documents
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,  # type: ignore[arg-type]
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **variables,
            )
        except (TemplateError, ValueError, TypeError) as error:
            raise APIError(
                400, f"the chat template refused the messages: {error}", param="messages"
            ) from error
        return str(text)

    # ----------------------------------------------------------------- tokenizer endpoints

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """vLLM's ``POST /tokenize``: a prompt, or ``messages`` through the chat template, as the
        token ids the engine would see (every served model shares the base's tokenizer; an
        unknown ``model`` is a 404). ``vllm bench serve`` uses it to align its prompts."""
        if request.model is not None:
            self.registry.resolve(request.model)
        if isinstance(request, TokenizeChatRequest):
            ids = self._encode(self._chat_text(request), request.add_special_tokens)
        else:
            ids = self._encode(request.prompt, request.add_special_tokens)
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

    # ----------------------------------------------------------------- preparing

    def prepare(self, request: AnyRequest) -> Prepared:
        """Check ``request`` and render it into prompts and sampling parameters; every refusal
        is an ``APIError`` naming the field, raised before anything reaches the engine (and
        while it still loads: a bad request is a 400 then too, a good one a 503)."""
        from vllm.exceptions import VLLMClientError

        self.registry.resolve(self.model_name(request))  # 404 before any work
        self._refuse_unserved(request)
        tool_schema = None
        if isinstance(request, ChatCompletionRequest):
            prompts = [self._chat_prompt(request)]
            tool_schema = _forced_tool_schema(request)
            if tool_schema is not None:
                request = _constrained_to(request, tool_schema)
            sent_new_name = request.max_completion_tokens is not None
            param = "max_completion_tokens" if sent_new_name else "max_tokens"
            max_tokens = self._max_tokens(request.max_completion_tokens or request.max_tokens, prompts, param)
        else:
            prompts = self._completion_prompts(request)
            max_tokens = self._max_tokens(request.max_tokens, prompts, "max_tokens")
        if request.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens}).",
                param="min_tokens",
            )
        # vLLM refuses n > 1 with greedy sampling; OpenAI allows it. _pieces runs such a request
        # as n single-sample copies (identical, as greedy decoding is deterministic).
        if request.temperature is not None and request.temperature < 1e-5:
            request = request.model_copy(update={"n": 1})
        try:
            params = request.to_sampling_params(max_tokens, {})
        except (VLLMClientError, ValueError) as error:
            raise _refusal(error, request) from error
        return Prepared(prompts, params, tool_schema)

    def _check_with_engine(self, request: AnyRequest, params: SamplingParams) -> None:
        """vLLM's own checks of the parameters against the model, before a stream starts."""
        from vllm.exceptions import VLLMClientError

        try:
            self.engine.check(params)
        except (VLLMClientError, ValueError) as error:
            raise _refusal(error, request) from error

    def model_name(self, request: AnyRequest) -> str:
        """``model`` as sent; like vLLM, a request without one asks for the base model."""
        return request.model or self.registry.base_name

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
        self, route: Route, prepared: Prepared, n: int, request_id: str, cache_salt: str | None
    ) -> AsyncIterator[Piece]:
        """Run every prompt as vLLM requests giving ``n`` samples each and yield their deltas
        as they arrive; choice index = prompt index · n + sample index."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        params = prepared.params
        copies = n // params.n  # > 1 only for greedy requests, see prepare

        async def pump(first_index: int, token_ids: list[int], vllm_request_id: str) -> None:
            try:
                prompt = TokensPrompt(prompt_token_ids=token_ids)
                if cache_salt:
                    prompt["cache_salt"] = cache_salt
                stream = self.engine.generate(prompt, params, vllm_request_id, route.adapter)  # type: ignore[arg-type]
                async for output in stream:
                    for sample in output.outputs:
                        if sample.finish_reason == "error":
                            raise APIError(500, "the engine failed while generating.", type="server_error")
                        piece = Piece(
                            first_index + sample.index,
                            sample.text,
                            list(sample.token_ids),
                            list(sample.logprobs) if sample.logprobs is not None else None,
                            sample.finish_reason,
                        )
                        await queue.put(piece)
                await queue.put(None)
            except (VLLMClientError, ValueError) as error:  # the engine's own checks of the request
                await queue.put(APIError(400, str(error), param=getattr(error, "parameter", None)))
            except BaseException as exc:  # forwarded to the consumer, which re-raises
                await queue.put(exc)

        tasks = [
            asyncio.create_task(pump(i * n + copy, ids, f"{request_id}-{i}-{copy}"))
            for i, ids in enumerate(prepared.prompts)
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
        async with self.registry.request(self.model_name(request)) as route:
            set_log_context(model=self.model_name(request), version=self.fingerprint(route))
            async for piece in self._pieces(route, prepared, n, response_id, request.cache_salt):
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
                async with self.registry.request(self.model_name(request)) as route:
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
                    async for piece in self._pieces(route, prepared, n, response_id, request.cache_salt):
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


def _refusal(error: Exception, request: AnyRequest) -> APIError:
    """vLLM's refusal of a request as a 400 naming the field: the one vLLM names, else the
    request field its message starts with ("min_tokens must be ...")."""
    param = getattr(error, "parameter", None)
    if param is None:
        first = str(error).split(" ", 1)[0].strip("`'")
        param = first if first in type(request).model_fields else None
    return APIError(400, str(error), param=param)


# --------------------------------------------------------------------------- chat helpers


def _template_message(index: int, message: Any) -> dict[str, Any]:
    """One message as the chat template sees it: role and content as one text (as training
    renders examples), plus ``name``, ``tool_calls`` and ``tool_call_id`` when sent.
    ``developer`` is OpenAI's newer name for ``system``; assistant ``content: null`` is empty."""
    if not isinstance(message, dict):  # vLLM also takes openai_harmony messages (gpt-oss's format)
        author = message.author
        parts = [{"type": "text", "text": getattr(part, "text", "")} for part in message.content or []]
        message = {"role": getattr(author.role, "value", author.role), "content": parts, "name": author.name}
    role = message.get("role")
    if not role:
        raise APIError(400, f"messages.{index}.role is required.", param=f"messages.{index}.role")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for part in _content_parts(index, content):
            if not isinstance(part, dict):  # a request model that lets any JSON through (/tokenize)
                raise APIError(
                    400,
                    f"messages.{index}.content holds a part that is not an object: {part!r:.40}.",
                    param=f"messages.{index}.content",
                )
            kind = part.get("type", "text" if "text" in part else None)
            if kind not in ("text", "refusal"):
                raise APIError(
                    400,
                    f"content parts of type {kind!r} are not supported: the served model reads text only.",
                    param=f"messages.{index}.content",
                    code="unsupported",
                )
            texts.append(str(part.get(kind, "")))
        text = "".join(texts)
    rendered = {"role": "system" if role == "developer" else role, "content": text}
    for key in ("name", "tool_calls", "tool_call_id"):
        if message.get(key):
            rendered[key] = message[key]
    return rendered


def _content_parts(index: int, content: Any) -> list[Any]:
    """A message's content parts, validated now: vLLM's request models keep an iterable of parts
    as a lazy pydantic iterator, which raises a ValidationError on a bad part — or, for some
    (``[[null, null]]`` in /tokenize, found by schemathesis), a pydantic-core panic, which is a
    BaseException. Either is the client's bad ``content``: a 400, not a 500."""
    try:
        return list(content)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise APIError(
            400,
            f"messages.{index}.content is not a list of content parts.",
            param=f"messages.{index}.content",
        ) from error


def _forced_tool_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a forced tool call's output follows: the named function's parameters,
    or (``required``) a list of ``{"name", "parameters"}`` calls, one at most unless
    ``parallel_tool_calls``. None when no tool call is forced (``none``, ``auto``: Lamina has no
    parser for a model's own tool-call syntax, so ``auto`` answers in text, as vLLM does
    without ``--enable-auto-tool-choice``)."""
    choice = request.tool_choice
    if not request.tools or choice in (None, "none", "auto"):
        return None
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError(
            400, "response_format cannot be combined with a forced tool call.", param="response_format"
        )
    if request.structured_outputs is not None:
        raise APIError(
            400, "structured_outputs cannot be combined with a forced tool call.", param="structured_outputs"
        )
    functions = {tool.function.name: tool.function.parameters or {"type": "object"} for tool in request.tools}
    if choice != "required":
        return functions[choice.function.name]  # type: ignore[union-attr]  # named; vLLM checked it exists
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
            "required": ["name", "parameters"],
        }
        for name, parameters in functions.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def _constrained_to(request: ChatCompletionRequest, schema: dict[str, Any]) -> ChatCompletionRequest:
    from vllm.sampling_params import StructuredOutputsParams

    return request.model_copy(update={"structured_outputs": StructuredOutputsParams(json=schema)})


def _usage(prompts: list[list[int]], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
