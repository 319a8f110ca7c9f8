"""PS-LoRA end to end with its dense magnitude merge written into the engine's weights
(``LAMINA_DENSE_MERGE_SERVING=weights``): the continual model answers the task, and the
aliases whose weights the engine no longer holds (base, task adapters) are not served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.service_stack import Stack, running_stack, wait_for, wait_until_served
from tests.integration.test_continual_service import HYPERPARAMETERS, TASK_A, accuracy

pytestmark = [pytest.mark.engine, pytest.mark.integration]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = {"LAMINA_DENSE_MERGE_SERVING": "weights"}
    with running_stack(tmp_path_factory.mktemp("lamina-dense"), settings) as stack:
        yield stack


def test_ps_lora_merge_is_served_from_the_engine_weights(stack: Stack) -> None:
    base_accuracy = accuracy(stack, "base", TASK_A)
    body = {
        "name": "codes",
        "method": "ps-lora",
        "examples": [{"prompt": p, "completion": c} for p, c in TASK_A],
        "hyperparameters": HYPERPARAMETERS,
    }
    response = httpx.post(f"{stack.url}/tasks", json=body, timeout=30)
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    wait_until_served(stack, job["merge_id"])

    assert accuracy(stack, "continual", TASK_A) >= 0.8 > base_accuracy
    served = {m["id"] for m in httpx.get(f"{stack.url}/v1/models").json()["data"]}
    assert served == {"continual"}, "base and task adapters would not mean what they say"
    answer = httpx.post(
        f"{stack.url}/v1/completions", json={"model": "continual", "prompt": "x", "max_tokens": 1}
    ).json()
    assert answer["system_fingerprint"] == f"continual@{job['merge_id']}"  # the merge in the weights
    response = httpx.post(
        f"{stack.url}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 1}
    )
    assert response.status_code == 404
