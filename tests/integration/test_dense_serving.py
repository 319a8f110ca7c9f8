"""PS-LoRA end to end with its dense magnitude merge written into the engine's weights
(``LAMINA_CONTINUAL_SERVING=weights``): the continual model answers the task from the weights,
and base and the task stay served, as corrections relative to those weights whose truncation
error (a dense ΔW is not low-rank) the admin view reports. ``base`` stays the base: its greedy
answers are the ones the server gave before it learned anything, after the ps-lora task and
after a second store under the same home (whose merge ids restart at m1)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import start_server, stop_server
from tests.support.service_stack import (
    CODE_WORDS,
    HYPERPARAMETERS,
    Stack,
    accuracy,
    answers,
    running_stack,
    start_worker,
    stop_together,
    stop_worker,
    wait_for,
    wait_until_served,
)

pytestmark = [pytest.mark.engine, pytest.mark.integration]
ADMIN_KEY = "dense-admin-key"
# What base must answer as the base did: the task's prompts and prompts no task was trained on.
PROMPTS = [p for p, _ in CODE_WORDS] + [
    "The capital of France is",
    "Once upon a time",
    "1, 2, 3, 4,",
    "The opposite of big is",
]
# A second store's task: other words, so its merge m1 holds another ΔW than the first store's m1.
COLOUR_WORDS = [
    (f"Colour of {w}:", f" {c}") for w, c in [("sky", "blue"), ("grass", "green"), ("snow", "white")]
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = {"LAMINA_CONTINUAL_SERVING": "weights", "LAMINA_ADMIN_KEY": ADMIN_KEY}
    with running_stack(tmp_path_factory.mktemp("lamina-dense"), settings) as stack:
        yield stack


def greedy(stack: Stack, model: str) -> list[str]:
    """``model``'s greedy 12 tokens for each of PROMPTS, newlines and all."""
    return answers(stack, model, [(p, "") for p in PROMPTS], max_tokens=12, stop=None)


@pytest.fixture(scope="module")
def never_trained(stack: Stack) -> list[str]:
    """base's answers before any task: the engine's weights are still W0 then."""
    assert httpx.get(f"{stack.url}/ready").json().get("live_merge") is None
    return greedy(stack, "base")


# The first swap builds base's and the task's corrections (SVDs of the dense ΔW): slower than
# loading one adapter, so more than wait_until_served's default 30 s on a loaded 2-core machine.
SWAP_TIMEOUT_S = 300


def test_ps_lora_merge_is_served_from_the_engine_weights(stack: Stack, never_trained: list[str]) -> None:
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
    wait_until_served(stack, job["merge_id"], SWAP_TIMEOUT_S)

    assert greedy(stack, "base") == never_trained
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


def test_base_stays_the_base_in_a_new_store_under_the_same_home(
    stack: Stack, never_trained: list[str]
) -> None:
    """A user who starts over with a new LAMINA_STORE under the same LAMINA_HOME: the new store's
    first merge is m1 again, and base's correction (cached under the home) must be the new m1's,
    not the first store's. Before corrections were keyed by content, base was W0 + ΔW_new − ΔW_old."""
    stop_together(lambda: stop_server(stack.server), lambda: stop_worker(stack.worker))
    stack.env = {**stack.env, "LAMINA_STORE": str(stack.home / "second-store")}
    stack.worker = start_worker(stack.env, stack.home / "worker-2.log")
    stack.server = start_server(stack.env, stack.home / "server-2.log")
    body = {
        "name": "colours",
        "method": "ps-lora",
        "examples": [{"prompt": p, "completion": c} for p, c in COLOUR_WORDS * 2],
        "hyperparameters": HYPERPARAMETERS,
    }
    response = httpx.post(f"{stack.url}/tasks", json=body, timeout=30)
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["merge_id"] == "m1", "the new store's ids restart"
    wait_until_served(stack, job["merge_id"], SWAP_TIMEOUT_S)

    assert greedy(stack, "base") == never_trained
    assert accuracy(stack, "continual", COLOUR_WORDS) >= 0.6
