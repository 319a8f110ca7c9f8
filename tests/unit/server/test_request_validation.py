"""Request validation and error shapes, without the engine: the app is built with
``start_engine=False`` and the service with an engine stand-in that claims to be ready
(these tests are about the code in front of the engine, not the engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import APIError
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.openai.serving import CompletionService
from server.settings import ServerSettings
from server.swap.registry import ModelRegistry


class ReadyEngine:
    ready = True


@pytest.fixture(scope="module")
def service(base_model_dir: Path) -> CompletionService:
    from transformers import AutoTokenizer

    settings = ServerSettings(model=base_model_dir, max_model_len=64)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    return CompletionService(settings, ReadyEngine(), ModelRegistry("base"), tokenizer)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path_factory.mktemp("home"))
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


def _raises(call, param: str, status: int = 400) -> APIError:  # type: ignore[no-untyped-def]
    with pytest.raises(APIError) as caught:
        call()
    assert (caught.value.status, caught.value.param) == (status, param)
    return caught.value


def test_prompt_longer_than_context_names_prompt(service: CompletionService) -> None:
    error = _raises(lambda: service.prepare(CompletionRequest(model="base", prompt="rain " * 100)), "prompt")
    assert error.code == "context_length_exceeded"


def test_max_tokens_beyond_context_names_max_tokens(service: CompletionService) -> None:
    request = CompletionRequest(model="base", prompt="rain", max_tokens=500)
    _raises(lambda: service.prepare(request), "max_tokens")


def test_chat_names_max_completion_tokens_when_that_was_sent(service: CompletionService) -> None:
    request = ChatCompletionRequest(
        model="base", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=500
    )
    _raises(lambda: service.prepare(request), "max_completion_tokens")


def test_chat_prompt_uses_default_template(service: CompletionService) -> None:
    request = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "hi"}])
    prompts, params, _ = service.prepare(request)
    text = service.tokenizer.decode(prompts[0])
    assert "<|user|>" in text and text.rstrip().endswith("<|assistant|>")
    assert params.max_tokens == 64 - len(prompts[0]), "chat defaults to the rest of the context"


def test_vllm_extensions_reach_the_sampling_parameters(service: CompletionService) -> None:
    request = CompletionRequest(
        model="base",
        prompt="x",
        max_tokens=8,
        ignore_eos=True,
        min_tokens=4,
        repetition_penalty=1.2,
    )
    params = service.prepare(request).params
    assert (params.ignore_eos, params.min_tokens, params.repetition_penalty) == (True, 4, 1.2)
    too_many = CompletionRequest(model="base", prompt="x", max_tokens=2, min_tokens=4)
    _raises(lambda: service.prepare(too_many), "min_tokens")


def test_chat_content_may_be_a_list_of_text_parts(service: CompletionService) -> None:
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    as_parts = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": parts}])
    as_text = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "hello"}])
    assert service.prepare(as_parts)[0] == service.prepare(as_text)[0]


def test_greedy_n_runs_as_single_sample_copies(service: CompletionService) -> None:
    params = service.prepare(CompletionRequest(model="base", prompt="x", n=3, temperature=0)).params
    assert params.n == 1
    params = service.prepare(CompletionRequest(model="base", prompt="x", n=3, temperature=0.7)).params
    assert params.n == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "base", "prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"model": "base", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "base", "prompt": []}, "prompt"),
        ({"model": "base"}, "prompt"),
        ({"model": "base", "prompt": "x", "logprobs": "five"}, "logprobs"),
        ({"model": "base", "prompt": "x", "min_tokens": -1}, "min_tokens"),
        ({"model": "base", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_completion_bodies_are_400_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_message_without_role_names_the_nested_field(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.role"


def test_unknown_model_is_404_before_engine_readiness(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_valid_request_while_loading_is_503_and_ready_says_so(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    response = client.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"


def test_bodies_over_the_limit_are_413_before_being_read(base_model_dir: Path, tmp_path: Path) -> None:
    settings = ServerSettings(
        model=base_model_dir, home=tmp_path, max_request_bytes=2048, max_file_bytes=1024, max_examples=3
    )
    with TestClient(create_app(settings, start_engine=False)) as small:
        response = small.post("/v1/completions", json={"model": "base", "prompt": "x" * 5000})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            for _ in range(10):
                yield b" " * 500

        streamed = small.post("/tasks", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413

        examples = [{"prompt": "a", "completion": "b"}] * 4
        too_many = small.post("/tasks", json={"name": "t", "method": "lori-s", "examples": examples})
        assert too_many.status_code == 413 and too_many.json()["error"]["param"] == "examples"


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_of_the_openapi_document_resolves(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    refs = set(_refs(document))
    assert "#/components/schemas/TaskCreate" in refs
    missing = {ref for ref in refs if ref.removeprefix("#/components/schemas/") not in components}
    assert missing == set()
    assert components["TaskCreate"]["properties"]["examples"]["items"] == {
        "$ref": "#/components/schemas/ExampleIn"
    }
