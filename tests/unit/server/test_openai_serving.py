"""The serving code around the engine, with an engine stand-in: errors inside a stream go
in-band as vLLM sends them, request ids, model cards, and how messages reach the template.
The real engine's answers are tested in tests/integration/test_openai_api.py."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import APIError
from server.openai.protocol import ChatCompletionRequest
from server.openai.serving import CompletionService
from server.settings import ServerSettings
from server.swap.registry import ModelRegistry


class ReadyEngine:
    ready = True

    def check(self, params: object) -> None:
        pass


class FailingEngine(ReadyEngine):
    """Answers one delta, then fails as a dead engine core would (or refuses at once)."""

    def __init__(self, error: Exception, after_first: bool = True) -> None:
        self.error, self.after_first = error, after_first

    async def generate(self, prompt: Any, params: Any, request_id: str, adapter: Any) -> AsyncIterator[Any]:
        if self.after_first:
            sample = SimpleNamespace(index=0, text="Hello", token_ids=[5], logprobs=None, finish_reason=None)
            yield SimpleNamespace(outputs=[sample])
        raise self.error


@pytest.fixture
def app_client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path)
    with TestClient(create_app(settings, start_engine=False)) as client:
        yield client


def _use_engine(client: TestClient, engine: ReadyEngine) -> None:
    client.app.state.completions.engine = engine  # type: ignore[attr-defined]


def _events(client: TestClient, body: dict) -> tuple[int, list[str]]:
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        return response.status_code, lines


def test_an_engine_failure_mid_stream_is_an_error_event_then_done(app_client: TestClient) -> None:
    _use_engine(app_client, FailingEngine(RuntimeError("engine core died")))
    status, events = _events(app_client, {"model": "base", "prompt": "hi", "max_tokens": 4, "stream": True})
    assert status == 200
    assert json.loads(events[0])["choices"][0]["text"] == "Hello"
    assert json.loads(events[-2]) == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    }
    assert events[-1] == "[DONE]"

    # the official client raises it as an APIError after the text that did arrive
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app_client)
    texts = []
    with pytest.raises(openai.APIError, match="internal server error"):
        for chunk in client.completions.create(model="base", prompt="hi", max_tokens=4, stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["Hello"]


def test_an_engine_refusal_is_a_400_or_an_in_band_400_once_streaming(app_client: TestClient) -> None:
    from vllm.exceptions import VLLMValidationError

    refusal = VLLMValidationError("bad_words are too many", parameter="bad_words")
    _use_engine(app_client, FailingEngine(refusal, after_first=False))
    body = {"model": "base", "prompt": "hi", "max_tokens": 4}
    answer = app_client.post("/v1/completions", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "bad_words"
    status, events = _events(app_client, {**body, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["param"] == "bad_words"


def test_request_id_is_echoed_generated_and_on_the_log_records(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert app_client.get("/health", headers={"X-Request-Id": "abc-1"}).headers["x-request-id"] == "abc-1"
    generated = app_client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unusable = app_client.get("/health", headers={"X-Request-Id": "x" * 500}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unusable)
    refused = app_client.post("/v1/completions", json={"model": "base", "prompt": "x", "suffix": "y"})
    assert refused.status_code == 400 and "x-request-id" in refused.headers

    class OneShot(ReadyEngine):
        async def generate(self, *args: Any) -> AsyncIterator[Any]:
            sample = SimpleNamespace(index=0, text="ok", token_ids=[5], logprobs=None, finish_reason="stop")
            yield SimpleNamespace(outputs=[sample])

    _use_engine(app_client, OneShot())
    with caplog.at_level(logging.INFO, logger="server.openai.serving"):
        answer = app_client.post(
            "/v1/completions", json={"model": "base", "prompt": "x"}, headers={"X-Request-Id": "req-42"}
        )
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "ok"
    records = [r for r in caplog.records if r.name == "server.openai.serving"]
    assert records and {r.request_id for r in records} == {"req-42"}  # type: ignore[attr-defined]


def test_model_cards_carry_root_parent_and_context(app_client: TestClient, base_model_dir: Path) -> None:
    card = app_client.get("/v1/models/base").json()
    assert card == {
        "id": "base",
        "object": "model",
        "created": card["created"],
        "owned_by": "lamina",
        "root": str(base_model_dir),
        "parent": None,
        "max_model_len": 512,
        "kind": "base",
        "exact": True,
        "relative_error": None,
    }
    listed = {c["id"]: c for c in app_client.get("/v1/models").json()["data"]}
    assert listed["base"] == card
    # the continual alias before any merge: the base model, under its own name
    assert listed["continual"]["root"] == str(base_model_dir) and listed["continual"]["parent"] == "base"
    missing = app_client.get("/v1/models/ghost")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- messages


@pytest.fixture(scope="module")
def service(base_model_dir: Path) -> CompletionService:
    from transformers import AutoTokenizer

    settings = ServerSettings(model=base_model_dir, max_model_len=256)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    return CompletionService(settings, ReadyEngine(), ModelRegistry("base"), tokenizer)  # type: ignore[arg-type]


def _rendered(service: CompletionService, messages: list[dict], **extra: Any) -> str:
    request = ChatCompletionRequest(model="base", messages=messages, **extra)
    return str(service.tokenizer.decode(service.prepare(request).prompts[0]))


def test_developer_is_system_and_null_content_is_empty(service: CompletionService) -> None:
    as_developer = _rendered(
        service, [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    as_system = _rendered(
        service, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert as_developer == as_system
    text = _rendered(service, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])
    assert "<|assistant|>\n\n" in text and "None" not in text


def test_tool_turns_reach_the_template(service: CompletionService) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    text = _rendered(
        service,
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
    )
    assert "<|tool|>\n42" in text


def test_non_text_content_is_refused_naming_the_message(service: CompletionService) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
    request = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": [image]}])
    with pytest.raises(APIError) as caught:
        service.prepare(request)
    assert caught.value.param == "messages.0.content"


def test_a_forced_tool_call_constrains_the_output_to_its_schema(service: CompletionService) -> None:
    parameters = {"type": "object", "properties": {"x": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    named = {"type": "function", "function": {"name": "f"}}
    prepared = service.prepare(
        ChatCompletionRequest(
            model="base", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=named
        )
    )
    assert prepared.tool_schema == parameters
    assert json.loads(json.dumps(prepared.params.structured_outputs.json)) == parameters  # type: ignore[union-attr]
    one = service.prepare(
        ChatCompletionRequest(
            model="base",
            messages=[{"role": "user", "content": "hi"}],
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
        )
    )
    assert one.tool_schema is not None and one.tool_schema["maxItems"] == 1
    auto = service.prepare(
        ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "hi"}], tools=tools)
    )
    assert auto.tool_schema is None and auto.params.structured_outputs is None


def test_a_harmony_message_renders_as_its_role_and_text(service: CompletionService) -> None:
    """vLLM's message union includes openai_harmony messages; they render like OpenAI's."""
    from openai_harmony import Message, Role

    from server.openai.chat_template import template_message

    harmony = Message.from_role_and_content(Role.USER, "hello")
    assert template_message(0, harmony) == {"role": "user", "content": "hello"}


def test_a_content_part_that_is_not_an_object_is_a_400_naming_the_message() -> None:
    """/tokenize's request model lets any JSON through as content (schemathesis sent [[null, null]])."""
    from server.errors import APIError
    from server.openai.chat_template import template_message

    with pytest.raises(APIError) as refused:
        template_message(2, {"role": "tool", "content": [[None, None]], "tool_call_id": ""})
    assert refused.value.status == 400 and refused.value.param == "messages.2.content"


def test_content_that_pydantic_cannot_iterate_is_a_400_not_a_panic() -> None:
    """schemathesis's body: vLLM's TokenizeChatRequest keeps the parts as a lazy iterator that
    panics inside pydantic-core when iterated; the message still gets a 400 naming it."""
    from pydantic import TypeAdapter

    from server.errors import APIError
    from server.openai.chat_template import template_message
    from server.openai.protocol import TokenizeRequest

    body = {"messages": [{"content": [[None, None]], "role": "tool", "tool_call_id": ""}]}
    request = TypeAdapter(TokenizeRequest).validate_python(body)
    with pytest.raises(APIError) as refused:
        template_message(0, request.messages[0])
    assert refused.value.status == 400 and refused.value.param == "messages.0.content"
