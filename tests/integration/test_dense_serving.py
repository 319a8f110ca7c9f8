"""PS-LoRA end to end with its dense magnitude merge written into the engine's weights
(``LAMINA_CONTINUAL_SERVING=weights``, the default): the continual model answers the task from
the weights, and base and the task stay served, as corrections relative to those weights whose
truncation error (a dense ΔW is not low-rank) the admin view reports."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.service_stack import CODE_WORDS, HYPERPARAMETERS, Stack, accuracy, running_stack, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.integration]
ADMIN_KEY = "dense-admin-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = {"LAMINA_CONTINUAL_SERVING": "weights", "LAMINA_ADMIN_KEY": ADMIN_KEY}
    with running_stack(tmp_path_factory.mktemp("lamina-dense"), settings) as stack:
        yield stack


def test_ps_lora_merge_is_served_from_the_engine_weights(stack: Stack) -> None:
    base_accuracy = accuracy(stack, "base", CODE_WORDS)
    body = {
        "name": "codes",
        "method": "ps-lora",
        "examples": [{"prompt": p, "completion": c} for p, c in CODE_WORDS],
        "hyperparameters": HYPERPARAMETERS,
    }
    response = httpx.post(f"{stack.url}/tasks", json=body, timeout=30)
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    # The first swap builds base's and the task's corrections (SVDs of the dense ΔW): slower than
    # loading one adapter, so more than wait_until_served's 30 s on a loaded 2-core machine.
    deadline = time.monotonic() + 300
    while httpx.get(f"{stack.url}/ready").json().get("live_merge") != job["merge_id"]:
        assert time.monotonic() < deadline, "the server never swapped to the new merge"
        time.sleep(0.5)

    assert accuracy(stack, "continual", CODE_WORDS) >= 0.8 > base_accuracy
    assert accuracy(stack, "codes", CODE_WORDS) >= 0.8
    served = {m["id"] for m in httpx.get(f"{stack.url}/v1/models").json()["data"]}
    assert served == {"base", "codes", "continual"}, "nothing a user could ask for disappears"
    merge = job["merge_id"]
    fingerprints = {}
    for model in served:
        # a task's prompt: continual routes it to the merge (a dense merge's task models are SVDs)
        body = {"model": model, "prompt": CODE_WORDS[0][0], "max_tokens": 1}
        fingerprints[model] = httpx.post(f"{stack.url}/v1/completions", json=body).json()[
            "system_fingerprint"
        ]
    assert fingerprints == {
        "continual": f"continual@{merge}",
        "base": f"base~{merge}",
        "codes": f"codes@v1~{merge}",
    }

    admin = httpx.get(f"{stack.url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    corrections = admin["served"]["corrections"]
    # One task: the magnitude merge is that task's ΔW, so base = −ΔW is an exact rank-8 LoRA and
    # the task's model is the weights themselves (a zero correction, no adapter).
    assert corrections["base"]["exact"] and corrections["base"]["rank"] == HYPERPARAMETERS["r"]
    assert corrections["codes"]["rank"] == 0 and corrections["codes"]["relative_error"] == 0
    assert admin["served"]["weights"]["merge"] == merge
