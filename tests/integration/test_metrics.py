"""``GET /metrics`` on a real server (uvicorn + vLLM on the CPU), parsed with prometheus_client's
own parser: vLLM's engine metrics and Lamina's, behind the admin key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import RunningServer, start_server, stop_server

pytestmark = pytest.mark.engine

ADMIN_KEY = "metrics-admin-key"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server({"LAMINA_ADMIN_KEY": ADMIN_KEY}, tmp_path_factory.mktemp("metrics") / "server.log")
    yield running
    stop_server(running)


def scrape(server: RunningServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels -> value}, parsed with prometheus_client's parser."""
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(found.get(name, {}).values())


def test_metrics_need_the_admin_key(admin_server: RunningServer) -> None:
    assert httpx.get(f"{admin_server.url}/metrics").status_code == 401
    wrong = httpx.get(f"{admin_server.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_a_completion_moves_lamina_and_engine_counters(admin_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{admin_server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    completion_key = (("endpoint", "completion"), ("model", "base"), ("version", "base"))
    chat_key = (("endpoint", "chat"), ("model", "base"), ("version", "base"))

    before = scrape(admin_server)
    result = client.completions.create(
        model="base", prompt="The weather today is", max_tokens=5, temperature=0
    )
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    )
    assert list(stream)  # read to the end: a stream counts once it is answered
    after = scrape(admin_server)

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
