"""From a validated completion or chat request to what the engine runs: prompts as token ids
and vLLM's sampling parameters.

Its own module because every refusal lives here: each is an ``APIError`` naming the field,
raised before anything reaches the engine (and while it still loads: a bad request is a 400
then too, a good one a 503). Prompts are tokenized here (not in vLLM) so that context-length
errors name the field, and a chat prompt is tokenized as training tokenizes it. Sampling
parameters come from vLLM's own ``to_sampling_params``, so vLLM's checks apply unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from server.errors import APIError
from server.openai.chat_template import ChatTemplate
from server.openai.protocol import AnyRequest, ChatCompletionRequest, CompletionRequest
from server.settings import ServerSettings
from server.swap.registry import ModelRegistry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams

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


class RequestPreparer:
    """Checks a request against the server's limits and renders its prompts."""

    def __init__(
        self, settings: ServerSettings, registry: ModelRegistry, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer)

    def model_name(self, request: AnyRequest) -> str:
        """``model`` as sent; like vLLM, a request without one asks for the base model."""
        return request.model or self.registry.base_name

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def prepare(self, request: AnyRequest) -> Prepared:
        """Check ``request`` and render it into prompts and sampling parameters."""
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
        # vLLM refuses n > 1 with greedy sampling; OpenAI allows it. The engine runner runs such
        # a request as n single-sample copies (identical, as greedy decoding is deterministic).
        if request.temperature is not None and request.temperature < 1e-5:
            request = request.model_copy(update={"n": 1})
        try:
            params = request.to_sampling_params(max_tokens, {})
        except (VLLMClientError, ValueError) as error:
            raise refusal(error, request) from error
        return Prepared(prompts, params, tool_schema)

    # ----------------------------------------------------------------- checks

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
                ids = self.encode(item, request.add_special_tokens)
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
        text = self.chat.render(request)
        special = request.add_special_tokens if "add_special_tokens" in request.model_fields_set else True
        return self._check_length(self._truncate(self.encode(text, special), request), "messages")


def refusal(error: Exception, request: AnyRequest) -> APIError:
    """vLLM's refusal of a request as a 400 naming the field: the one vLLM names, else the
    request field its message starts with ("min_tokens must be ...")."""
    param = getattr(error, "parameter", None)
    if param is None:
        first = str(error).split(" ", 1)[0].strip("`'")
        param = first if first in type(request).model_fields else None
    return APIError(400, str(error), param=param)


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
