"""The OpenAI-compatible API, driven with the official ``openai`` client against a real server
(uvicorn + vLLM on the CPU); and that server's ``GET /metrics``, parsed with prometheus_client's
own parser: vLLM's engine metrics and Lamina's, behind the admin key."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import SERVER_ADMIN_KEY, RunningServer

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir))


def test_health_and_ready(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_models_lists_base(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert "base" in ids


def test_completion_respects_max_tokens_and_reports_usage(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="base", prompt="The weather today is", max_tokens=7, temperature=0
    )
    choice = result.choices[0]
    assert result.object == "text_completion"
    assert choice.finish_reason in ("stop", "length")
    assert result.usage is not None and 1 <= result.usage.completion_tokens <= 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_greedy_completion_is_deterministic(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="Q: what is 2 + 3? A:", max_tokens=8, temperature=0)
    first = client.completions.create(**args).choices[0].text
    second = client.completions.create(**args).choices[0].text
    assert first == second and first != ""


def test_n_and_batched_prompts_give_one_choice_each(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="base", prompt=["The cat", "A song"], n=3, max_tokens=4, temperature=0.9, seed=1
    )
    assert sorted(c.index for c in result.choices) == list(range(6))


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="The food", max_tokens=12, temperature=1.0, seed=1234)
    assert (
        client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text
    )


def test_stop_sequence_ends_the_text(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model="base", prompt="The music", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 3
    stop = full[2:4]
    cut = client.completions.create(
        model="base", prompt="The music", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_completion_arrives_incrementally_and_matches(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="Sports news:", max_tokens=16, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices]
    assert len([c for c in chunks if c]) > 1, "expected several chunks, not one"
    assert "".join(chunks) == whole


def test_chat_completion(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="base",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.usage is not None and result.usage.completion_tokens <= 6


def test_streamed_chat_matches_non_streamed(client: openai.OpenAI) -> None:
    args = dict(
        model="base",
        messages=[{"role": "user", "content": "Tell me about rain"}],
        max_tokens=12,
        temperature=0,
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    error = caught.value.body
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="hi", **extra)
    assert caught.value.body["param"] == param


def test_prompt_longer_than_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="word " * 2000, max_tokens=4)
    assert caught.value.body["param"] == "prompt"
    assert caught.value.body["code"] == "context_length_exceeded"


def test_malformed_json_is_400_not_500(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json()


def test_client_disconnect_mid_stream_leaves_server_healthy(
    server: RunningServer, client: openai.OpenAI
) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"model": "base", "prompt": "Long story:", "max_tokens": 200, "stream": True, "temperature": 0},
    ) as response:
        for _ in response.iter_lines():
            break  # hang up after the first event
    time.sleep(0.5)
    assert client.completions.create(model="base", prompt="hi", max_tokens=2).choices


def test_system_fingerprint_names_the_version_that_answered(client: openai.OpenAI) -> None:
    """Every answer says which engine adapter version served it ("base" for none), and one
    streamed answer never mixes versions: the route is leased once per request."""
    args = dict(model="base", prompt="The river", max_tokens=8, temperature=0)
    assert client.completions.create(**args).system_fingerprint == "base"
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 1 and {c.system_fingerprint for c in chunks} == {"base"}
    chat = dict(model="base", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0)
    assert client.chat.completions.create(**chat).system_fingerprint == "base"
    assert {c.system_fingerprint for c in client.chat.completions.create(**chat, stream=True)} == {"base"}


# --------------------------------------------------------------------------- what vLLM accepts

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def _text(answer: Any) -> str:
    choice = answer.choices[0]
    return choice.text if answer.object == "text_completion" else (choice.message.content or "")


def _has_text(answer: Any) -> bool:
    return answer.usage.completion_tokens >= 1 and isinstance(_text(answer), str)


def _one_call(answer: Any) -> bool:
    calls = answer.choices[0].message.tool_calls
    return (
        len(calls) == 1
        and calls[0].function.name == "get_weather"
        and set(json.loads(calls[0].function.arguments)) == {"city"}
        and answer.choices[0].message.content is None
        and answer.choices[0].finish_reason == "tool_calls"
    )


# The 21 ordinary bodies that vLLM's server accepts and Lamina once refused, each with what its
# answer must show: (endpoint, arguments of the openai client, check of the answer).
BODIES: dict[str, tuple[str, dict[str, Any], Callable[[Any], bool]]] = {
    "completion-logprobs": (
        "completions",
        {"logprobs": 2},
        lambda a: len(a.choices[0].logprobs.tokens) == a.usage.completion_tokens,
    ),
    "chat-logprobs-false": ("chat", {"logprobs": False}, lambda a: a.choices[0].logprobs is None),
    "chat-top-logprobs": (
        "chat",
        {"logprobs": True, "top_logprobs": 2},
        lambda a: all(len(t.top_logprobs) == 2 for t in a.choices[0].logprobs.content),
    ),
    "response-format-json-object": (
        "chat",
        {"response_format": {"type": "json_object"}, "max_tokens": 40},
        lambda a: a.choices[0].finish_reason == "length" or isinstance(json.loads(_text(a)), dict),
    ),
    "response-format-json-schema": (
        "chat",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY_SCHEMA},
            },
            "max_tokens": 40,
        },
        lambda a: set(json.loads(_text(a))) == {"city"},
    ),
    "tools": ("chat", {"tools": [WEATHER]}, _has_text),  # auto: answered in text (no tool parser)
    "tool-choice-named": (
        "chat",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        _one_call,
    ),
    "parallel-tool-calls": (
        "chat",
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 40},
        _one_call,
    ),
    "developer-role": (
        "chat",
        {"messages": [{"role": "developer", "content": "Answer briefly."}, *CHAT]},
        _has_text,
    ),
    "tool-role": (
        "chat",
        {
            "messages": [
                *CHAT,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call-1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
            ],
            "tools": [WEATHER],
            "tool_choice": "none",
        },
        _has_text,
    ),
    "assistant-content-null": (
        "chat",
        {"messages": [*CHAT, {"role": "assistant", "content": None}, {"role": "user", "content": "And?"}]},
        _has_text,
    ),
    "top-k": ("completions", {"extra_body": {"top_k": 5}, "seed": 0}, _has_text),
    "min-p": ("chat", {"extra_body": {"min_p": 0.1}, "seed": 0, "temperature": 1.0}, _has_text),
    "temperature-null": ("completions", {"temperature": None, "seed": 0}, _has_text),
    "suffix-empty": ("completions", {"suffix": ""}, _has_text),
    "logit-bias": ("completions", {"logit_bias": {"50": -100}}, _has_text),
    "best-of-1": ("completions", {"best_of": 1}, lambda a: len(a.choices) == 1),
    "token-id-prompt": ("completions", {"prompt": [0, 274, 269, 431]}, lambda a: a.usage.prompt_tokens == 4),
    "token-id-prompts": (
        "completions",
        {"prompt": [[0, 274], [0, 269, 431]]},
        lambda a: sorted(c.index for c in a.choices) == [0, 1] and a.usage.prompt_tokens == 5,
    ),
    "store": ("chat", {"store": True, "metadata": {"run": "test"}}, _has_text),
    "service-tier": ("chat", {"service_tier": "auto"}, _has_text),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_bodies_vllm_accepts_are_served(client: openai.OpenAI, name: str) -> None:
    endpoint, arguments, check = BODIES[name]
    arguments = {"model": "base", "max_tokens": 8, "temperature": 0, **arguments}
    if endpoint == "chat":
        answer = client.chat.completions.create(**{"messages": CHAT, **arguments})
    else:
        answer = client.completions.create(**{"prompt": "The weather today is", **arguments})
    assert check(answer), answer.model_dump()


def test_completion_logprobs_are_the_greedy_tokens(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="The weather today is", max_tokens=8, temperature=0)
    answer = client.completions.create(**args, logprobs=3).choices[0]
    logprobs = answer.logprobs
    assert answer.text == client.completions.create(**args).choices[0].text, "logprobs change nothing"
    assert "".join(logprobs.tokens) == answer.text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    for token, logprob, top, offset in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset, strict=True
    ):
        assert 3 <= len(top) <= 4 and all(value <= 0 for value in top.values())
        assert max(top, key=top.__getitem__) == token, "greedy: the sampled token is the most likely"
        assert top[token] == pytest.approx(logprob) and logprob == max(top.values())
        assert answer.text[offset:].startswith(token)
    streamed = [
        c.choices[0].logprobs for c in client.completions.create(**args, logprobs=3, stream=True) if c.choices
    ]
    assert [t for chunk in streamed if chunk for t in chunk.tokens] == logprobs.tokens
    assert [t for chunk in streamed if chunk for t in chunk.text_offset] == logprobs.text_offset


def test_chat_logprobs_are_the_greedy_tokens(client: openai.OpenAI) -> None:
    args = dict(model="base", messages=CHAT, max_tokens=8, temperature=0)
    answer = client.chat.completions.create(**args, logprobs=True, top_logprobs=3).choices[0]
    content = answer.logprobs.content
    assert "".join(t.token for t in content) == answer.message.content
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) and entry.logprob <= 0
        assert bytes(entry.bytes) == entry.token.encode()
    chunks = list(client.chat.completions.create(**args, logprobs=True, top_logprobs=3, stream=True))
    streamed = [
        t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert streamed == [t.token for t in content]


def test_top_k_1_and_min_p_1_sample_the_greedy_answer(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="The food", max_tokens=12)
    greedy = client.completions.create(**args, temperature=0).choices[0].text
    free = [client.completions.create(**args, temperature=1.0, seed=s).choices[0].text for s in range(3)]
    assert any(text != greedy for text in free), "sampling at temperature 1 should differ from greedy"
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in range(3):
            answer = client.completions.create(**args, temperature=1.0, seed=seed, extra_body=extra)
            assert answer.choices[0].text == greedy, extra


def test_logit_bias_forces_a_token(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    token_id = tokenizer(" sun", add_special_tokens=False)["input_ids"][-1]
    answer = client.completions.create(
        model="base",
        prompt="The weather",
        max_tokens=4,
        temperature=0,
        logit_bias={str(token_id): 100},
        logprobs=0,
    )
    assert answer.choices[0].logprobs.tokens == [tokenizer.decode([token_id])] * 4


def test_token_id_prompt_answers_as_its_text(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "The weather today is"
    args = dict(model="base", max_tokens=8, temperature=0)
    by_text = client.completions.create(prompt=text, **args)
    by_ids = client.completions.create(prompt=tokenizer(text)["input_ids"], **args)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_json_schema_answer_parses_and_follows_the_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    for stream in (False, True):
        args = dict(
            model="base",
            messages=CHAT,
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
        )
        if stream:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**args, stream=True)
                if c.choices
            )
        else:
            text = client.chat.completions.create(**args).choices[0].message.content
        value = json.loads(text)
        assert set(value) == {"city", "sunny"}
        assert (
            isinstance(value["city"], str) and len(value["city"]) <= 12 and isinstance(value["sunny"], bool)
        )


def test_a_streamed_forced_tool_call_arrives_whole(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="base",
            messages=CHAT,
            max_tokens=40,
            temperature=0,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("completions", {"suffix": "and so on."}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"extra_body": {"use_beam_search": True}}, "use_beam_search"),
        ("completions", {"echo": True, "logprobs": 1}, "echo"),
        ("chat", {"extra_body": {"chat_template": "{{ messages }}"}}, "chat_template"),
        ("chat", {"extra_body": {"allowed_token_ids": [10**9]}}, "allowed_token_ids"),
    ],
)
def test_what_is_not_served_is_refused_naming_the_field(
    client: openai.OpenAI, endpoint: str, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(model="base", messages=CHAT, max_tokens=4, **extra)
        else:
            client.completions.create(model="base", prompt="hi", max_tokens=4, **extra)
    assert caught.value.body["param"] == param


def test_unknown_fields_are_ignored_as_vllm_ignores_them(client: openai.OpenAI) -> None:
    args = dict(model="base", prompt="The river", max_tokens=6, temperature=0)
    plain = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args, extra_body={"no_such_field": [1, 2]}).choices[0].text == plain


# --------------------------------------------------------------------------- models, request ids


def test_retrieve_a_model_card_as_vllm_describes_one(client: openai.OpenAI, server: RunningServer) -> None:
    card = client.models.retrieve("base")
    assert card.id == "base" and card.object == "model"
    extra = card.model_extra or {}
    assert extra["max_model_len"] == 512 and extra["parent"] is None and extra["root"]
    assert [m for m in client.models.list().data if m.id == "base"][0].model_extra == extra
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_request_id_is_echoed_and_logged(client: openai.OpenAI, server: RunningServer) -> None:
    request_id = f"test-{uuid.uuid4().hex[:12]}"
    raw = client.completions.with_raw_response.create(
        model="base", prompt="The hill", max_tokens=3, extra_headers={"X-Request-Id": request_id}
    )
    assert raw.headers["x-request-id"] == request_id
    deadline = time.monotonic() + 5
    while request_id not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = [line for line in server.log_path.read_text().splitlines() if request_id in line]
    assert any("completion model=base" in line for line in logged), logged
    # generated when absent, on errors and streams too
    missing = httpx.get(f"{server.url}/v1/models/ghost")
    assert missing.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"model": "base", "prompt": "hi", "max_tokens": 2, "stream": True},
        headers={"X-Request-Id": request_id + "-s"},
    ) as response:
        assert response.headers["x-request-id"] == request_id + "-s"


def test_tokenize_and_detokenize_as_vllm_serves_them(server: RunningServer, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """vLLM's /tokenize and /detokenize (``vllm bench serve`` aligns its prompts with them)."""
    text = "The weather today is"
    answer = httpx.post(
        f"{server.url}/tokenize", json={"model": "continual", "prompt": text, "add_special_tokens": False}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] > 0
    back = httpx.post(f"{server.url}/detokenize", json={"model": "base", "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": tokenizer.decode(ids)}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 1
    unknown = httpx.post(f"{server.url}/tokenize", json={"model": "no-such-model", "prompt": text})
    assert unknown.status_code == 404
    outside = httpx.post(f"{server.url}/detokenize", json={"tokens": [len(tokenizer) + 5]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_vllm_bench_serve_bodies_stream_every_token_and_usage(server: RunningServer, endpoint: str) -> None:
    """The bodies ``vllm bench serve`` (0.32, openai / openai-chat backends, random dataset)
    sends: every requested token arrives (``ignore_eos``) and the last event carries usage."""
    body: dict[str, Any] = {"model": "continual", "stream": True, "stream_options": {"include_usage": True}}
    body |= {"ignore_eos": True, "repetition_penalty": 1.0, "logprobs": None}
    if endpoint == "completions":
        body |= {"prompt": "The weather today is", "max_tokens": 16}
    else:
        body |= {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 16}
    with httpx.stream("POST", f"{server.url}/v1/{endpoint}", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        events = [line.removeprefix("data: ") for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(not chunk.get("usage") for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16


# --- /metrics ---------------------------------------------------------------------------------


def scrape(server: RunningServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels -> value}, parsed with prometheus_client's parser."""
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {SERVER_ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(found.get(name, {}).values())


def test_metrics_need_the_admin_key(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    wrong = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_a_completion_moves_lamina_and_engine_counters(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=SERVER_ADMIN_KEY, max_retries=0)
    completion_key = (("endpoint", "completion"), ("model", "base"), ("version", "base"))
    chat_key = (("endpoint", "chat"), ("model", "base"), ("version", "base"))

    before = scrape(server)
    result = client.completions.create(
        model="base", prompt="The weather today is", max_tokens=5, temperature=0
    )
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    )
    assert list(stream)  # read to the end: a stream counts once it is answered
    after = scrape(server)

    requests_before = before.get("lamina_requests_total", {})
    assert after["lamina_requests_total"][completion_key] == requests_before.get(completion_key, 0) + 1
    assert after["lamina_requests_total"][chat_key] == requests_before.get(chat_key, 0) + 1

    # vLLM's own engine metrics, recorded in-process and exposed here
    assert result.usage is not None
    assert total(after, "vllm:request_success_total") >= total(before, "vllm:request_success_total") + 1
    assert total(after, "vllm:prompt_tokens_total") >= total(before, "vllm:prompt_tokens_total") + (
        result.usage.prompt_tokens
    )
    assert "vllm:num_requests_running" in after

    # the job board and the store as this fresh server sees them: no job, nothing swapped yet
    assert after["lamina_jobs"][(("status", "queued"),)] == 0
    assert total(after, "lamina_hot_swaps_total") == 0
    assert total(after, "lamina_subspace_occupancy_max") == 0
