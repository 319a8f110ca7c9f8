"""The OpenAI-compatible API, driven with the official ``openai`` client against a real server
(uvicorn + vLLM on the CPU)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


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
