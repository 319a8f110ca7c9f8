"""Chat messages through the model's chat template, as text.

Its own module because three callers need the very same rendering: chat completions, the
``/tokenize`` endpoint (``vllm bench serve`` aligns its prompts with it), and training, which
renders chat examples with the same default template (:data:`trainer.contract.chat.DEFAULT_CHAT_TEMPLATE`):
a served prompt must be the token sequence the adapter was trained on. Every way a message
can be malformed is a 400 naming ``messages.N.<field>`` here, before the template runs.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from server.errors import APIError
from server.openai.protocol import ChatCompletionRequest, TokenizeChatRequest
from trainer.contract.chat import DEFAULT_CHAT_TEMPLATE  # training renders chat examples with it too

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ChatTemplate:
    """The tokenizer's chat template (the training default where the tokenizer has none)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        # Tools reach the model only through a template that renders them.
        self.renders_tools = "tools" in str(tokenizer.chat_template)
        # chat_template_kwargs are template variables; apply_chat_template's own arguments are not
        self._arguments = set(inspect.signature(tokenizer.apply_chat_template).parameters)

    def render(self, request: ChatCompletionRequest | TokenizeChatRequest) -> str:
        """``messages`` rendered by the chat template (a 400 naming ``messages`` if it refuses)."""
        from jinja2 import TemplateError

        if not request.messages:
            raise APIError(400, "messages must hold at least one message.", param="messages")
        conversation = [template_message(i, m) for i, m in enumerate(request.messages)]
        variables = {
            k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in self._arguments
        }
        if request.tools and self.renders_tools:
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


def template_message(index: int, message: Any) -> dict[str, Any]:
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
