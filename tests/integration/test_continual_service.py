"""The product end to end: real Redis, a real ``lamina worker`` process and the real server.

Post task A, wait for it, query it as ``model=A`` and ``model=continual``; post task B; the
continual model answers both and A's own adapter still answers A. A cancelled job and a
failed job leave the live model exactly as it was. Bad submissions are refused with a 4xx
naming the field, and nothing is queued.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.support import service_stack
from tests.support.browser import SWAP_TIMEOUT_MS, browser, follow_on_page, open_page, sign_in
from tests.support.service_stack import (
    CODE_WORDS,
    HYPERPARAMETERS,
    Stack,
    accuracy,
    answers,
    require_redis,
    running_stack,
    served_models,
    wait_for,
    wait_until_served,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.engine, pytest.mark.integration]
__all__ = ["browser"]  # a fixture: the admin page's tests below ask for it

ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
METHOD = "own-lora"  # the default method: learning B must not move A's answers
TASK_A = CODE_WORDS
TASK_B = [
    (f"Opposite of {w} =", f" {o}")
    for w, o in [
        ("hot", "cold"),
        ("up", "down"),
        ("big", "small"),
        ("fast", "slow"),
        ("open", "shut"),
        ("early", "late"),
    ]
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_redis()
    settings = {
        "LAMINA_DEFAULT_METHOD": METHOD,
        "LAMINA_ADMIN_KEY": ADMIN_KEY,
        "LAMINA_PLUGINS": "tests.plugins.toy_method",  # a method registered in one module, server and worker
    }
    with running_stack(tmp_path_factory.mktemp("lamina-home"), settings) as stack:
        yield stack


def post_task(
    stack: Stack,
    name: str,
    examples: list[tuple[str, str]],
    hyperparameters: dict = HYPERPARAMETERS,
    **extra: object,
) -> httpx.Response:
    return service_stack.post_task(stack, name, examples, METHOD, hyperparameters, **extra)


def train(stack: Stack, name: str, examples: list[tuple[str, str]]) -> dict:
    response = post_task(stack, name, examples)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "task.job" and job["status"] == "queued"
    job = wait_for(stack, job["id"])
    assert job["status"] == "succeeded", job["error"]
    wait_until_served(stack, job["merge_id"])
    return job


def test_learns_a_then_b_and_keeps_a(stack: Stack) -> None:
    base_a = accuracy(stack, "base", TASK_A)
    job_a = train(stack, "codes", TASK_A)
    assert job_a["progress"]["step"] == job_a["progress"]["total"]
    assert job_a["metrics"]["final_loss"] < job_a["metrics"]["initial_loss"]
    models = {m["id"] for m in httpx.get(f"{stack.url}/v1/models").json()["data"]}
    assert {"base", "continual", "codes"} <= models
    assert accuracy(stack, "codes", TASK_A) >= 0.8 > base_a
    assert accuracy(stack, "continual", TASK_A) >= 0.8

    a_before = answers(stack, "continual", TASK_A)
    train(stack, "opposites", TASK_B)
    assert answers(stack, "continual", TASK_A) == a_before, "learning B moved A's greedy answers"
    assert accuracy(stack, "continual", TASK_B) >= 0.8
    # Each task's own model is the model as it was when the task was learned.
    assert accuracy(stack, "opposites", TASK_B) >= 0.8
    assert accuracy(stack, "codes", TASK_A) >= 0.8, "A's own model must not change"


# --- the admin page (/admin/ui) in a real browser ------------------------------------------------
# Headless Chromium (Debian's, driven by Playwright: tests/support/browser.py) on this module's
# stack: a wrong key is refused; a task posted through the API is followed on the page to
# `succeeded` (its loss curve drawn) and its row appears in the heat map; the page's rollback
# button (confirmed in the browser's dialog) makes the previous merge live again: the page shows
# it and `continual` no longer answers the task's prompts.

TASK_D = [
    (f"Flag {n} is coloured", f" {c}")
    for n, c in zip(range(1, 7), ["teal", "plum", "gold", "rust", "navy", "lime"], strict=True)
]


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    yield from open_page(browser, stack)


def test_the_admin_page_refuses_a_wrong_key_with_the_apis_message(page: Page) -> None:
    from playwright.sync_api import expect

    sign_in(page, "not-the-key")
    expect(page.get_by_role("alert")).to_have_text("Key refused: this key may not use the admin endpoints.")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('lamina-admin-key')") is None


def test_the_admin_page_follows_a_job_shows_its_row_and_rolls_back(page: Page, stack: Stack) -> None:
    from playwright.sync_api import expect

    assert accuracy(stack, "base", TASK_D) < 0.5, "the base must not know the task already"
    both = httpx.get(f"{stack.url}/ready").json()["live_merge"]  # codes and opposites
    sign_in(page, ADMIN_KEY)
    expect(page.locator("#live-merge")).to_have_text(both)
    assert page.evaluate("sessionStorage.getItem('lamina-admin-key')") == ADMIN_KEY
    heatmap = page.locator("#heatmap")
    expect(heatmap.locator("tbody tr")).to_have_count(2)

    response = post_task(stack, "flags", TASK_D)
    assert response.status_code == 202, response.text
    job = follow_on_page(page, stack, response.json()["id"])
    row = heatmap.locator(f'tbody tr[data-after="{job["task_version"]}"]')
    expect(row.locator('td[data-task="flags"]')).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
    expect(row.locator("td.general")).to_have_text(re.compile(r"^\d+(\.\d+)?%$"))
    expect(page.locator("#live-merge")).to_have_text(job["merge_id"])
    wait_until_served(stack, job["merge_id"])
    assert accuracy(stack, "continual", TASK_D) >= 0.8

    # Roll back through the page: a dismissed confirmation changes nothing ...
    rollback = page.get_by_role("button", name=f"Roll back to {both}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    rollback.click()
    assert httpx.get(f"{stack.url}/ready").json()["live_merge"] == job["merge_id"]
    # ... an accepted one rolls back, and the page shows it
    questions: list[str] = []

    def accept(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    rollback.click()
    expect(page.get_by_role("alert")).to_have_text(f"Rolled back: {both} is live.")
    assert questions and both in questions[0]
    expect(page.locator("#live-merge")).to_have_text(both, timeout=SWAP_TIMEOUT_MS)
    expect(page.locator(f'#merges tr[data-merge="{both}"]')).to_have_class("live")
    expect(page.locator('#tasks tr[data-task="flags"]')).to_have_count(0)
    expect(heatmap.locator("tbody tr")).to_have_count(2)

    wait_until_served(stack, both)
    assert accuracy(stack, "continual", TASK_D) < 0.5, "continual still answers the rolled-back task"
    assert accuracy(stack, "continual", TASK_A) >= 0.8


GENERAL_PROMPTS = [  # plain text, like none of the tasks' prompts
    "The weather today is",
    "Once upon a time there was",
    "My favourite food is",
    "The history of the city",
    "She opened the door and",
    "In the morning we",
]


def _one_by_one(stack: Stack, model: str, prompts: list[str]) -> list[tuple[str, str | None]]:
    """Greedy answers and system_fingerprints, one request per prompt (a request is routed whole)."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    out = []
    for prompt in prompts:
        result = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        out.append((result.choices[0].text, result.system_fingerprint))
    return out


def _routes(stack: Stack) -> dict[str, float]:
    """lamina_continual_routes_total by destination, from /metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{stack.url}/metrics", headers=ADMIN).text.splitlines():
        if line.startswith("lamina_continual_routes_total{"):
            counts[line.split('to="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def test_continual_gives_general_prompts_the_base_answer(stack: Stack) -> None:
    """After two tasks, a prompt like neither task's gets the base model's own greedy answer on
    `continual` (it is routed to the base), while both tasks' prompts are still answered."""
    assert {"codes", "opposites"} <= served_models(stack)
    before = _routes(stack).get("base", 0)
    base = _one_by_one(stack, "base", GENERAL_PROMPTS)
    continual = _one_by_one(stack, "continual", GENERAL_PROMPTS)
    assert [text for text, _ in continual] == [text for text, _ in base]
    assert [fp for _, fp in continual] == [fp for _, fp in base], "answered by the base itself"
    assert _routes(stack)["base"] - before == len(GENERAL_PROMPTS)
    task_prompts = [p for p, _ in TASK_A[:3] + TASK_B[:3]]
    assert all(fp != base[0][1] for _, fp in _one_by_one(stack, "continual", task_prompts))
    assert accuracy(stack, "continual", TASK_A) >= 0.8 and accuracy(stack, "continual", TASK_B) >= 0.8


def test_a_task_for_every_prompt_reaches_general_prompts(stack: Stack) -> None:
    """hyperparameters.applies_to = "all" (a style, a persona): while the task is live, `continual`
    answers every prompt with the merge, general prompts included; removing it gives them back
    to the base (the tests after this one expect the two tasks above and nothing else)."""
    style = [(p, " indeed") for p in ("Tell me more", "What now", "Go on", "And then", "Why so", "Say it")]
    response = post_task(stack, "indeed", style, hyperparameters={**HYPERPARAMETERS, "applies_to": "all"})
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    # meant to change every answer: the base's general answers move, with a warning, no refusal
    assert any("applies to every prompt" in w for w in job["warnings"]), job["warnings"]
    wait_until_served(stack, job["merge_id"])
    before = _routes(stack).get("merge", 0)
    base = _one_by_one(stack, "base", GENERAL_PROMPTS)
    continual = _one_by_one(stack, "continual", GENERAL_PROMPTS)
    assert all(fp != base_fp for (_, fp), (_, base_fp) in zip(continual, base, strict=True))
    assert _routes(stack)["merge"] - before == len(GENERAL_PROMPTS)
    removed = httpx.delete(f"{stack.url}/admin/tasks/indeed", headers=ADMIN)
    assert removed.status_code == 200, removed.text
    wait_until_served(stack, removed.json()["live_merge"]["id"])
    assert [t for t, _ in _one_by_one(stack, "continual", GENERAL_PROMPTS)] == [t for t, _ in base]


def _live_state(stack: Stack) -> tuple[str | None, list[str]]:
    return httpx.get(f"{stack.url}/ready").json()["live_merge"], answers(stack, "continual", TASK_A + TASK_B)


def test_cancelled_job_leaves_continual_unchanged(stack: Stack) -> None:
    before = _live_state(stack)
    response = post_task(stack, "cancelled-task", TASK_B, hyperparameters={**HYPERPARAMETERS, "steps": 5000})
    job_id = response.json()["id"]
    wait_for(stack, job_id, ("running",))
    cancelled = httpx.post(f"{stack.url}/tasks/{job_id}/cancel").json()
    assert cancelled["cancel_requested"] or cancelled["status"] == "cancelled"
    job = wait_for(stack, job_id)
    assert job["status"] == "cancelled"
    assert _live_state(stack) == before
    assert not (stack.home / "store" / "tasks" / "cancelled-task").exists()


def test_failed_job_leaves_continual_unchanged(stack: Stack) -> None:
    before = _live_state(stack)
    # Valid in shape, but the model has no such layer: only the worker can find that out.
    response = post_task(
        stack, "failing-task", TASK_B, hyperparameters={**HYPERPARAMETERS, "target_modules": ["nope_proj"]}
    )
    assert response.status_code == 202
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "failed"
    assert "nope_proj" in job["error"]["message"]
    assert _live_state(stack) == before
    assert not (stack.home / "store" / "tasks" / "failing-task").exists()


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"name": "Bad Name"}, 400, "name"),
        ({"name": "../escape"}, 400, "name"),
        ({"name": "/etc/passwd"}, 400, "name"),
        ({"name": "c\u043ede"}, 400, "name"),  # Cyrillic o: a look-alike of "code"
        ({"name": "continual"}, 400, "name"),
        ({"name": "base"}, 400, "name"),
        ({"name": "codes"}, 409, "name"),
        ({"method": "no-such-method"}, 400, "method"),
        ({"method": "ps-lora"}, 409, "method"),
        ({"examples": []}, 400, "examples"),
        ({"examples": [{"prompt": "x"}]}, 400, "examples.0.completion"),
        ({"hyperparameters": {"r": 0}}, 400, "hyperparameters.r"),
        ({"hyperparameters": {"bogus": 1}}, 400, "hyperparameters.bogus"),
        ({"hyperparameters": {"r": 128}}, 409, "hyperparameters.r"),
    ],
)
def test_bad_submissions_are_refused_and_nothing_is_queued(
    stack: Stack, change: dict, status: int, param: str
) -> None:
    before = len(httpx.get(f"{stack.url}/tasks").json()["data"])
    body = {
        "name": "fresh-task",
        "method": METHOD,
        "examples": [{"prompt": "a", "completion": "b"}],
        **change,
    }
    response = httpx.post(f"{stack.url}/tasks", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert len(httpx.get(f"{stack.url}/tasks").json()["data"]) == before


def test_jsonl_upload_errors_name_the_line(stack: Stack) -> None:
    content = b'{"prompt": "a", "completion": "b"}\nnot json\n'
    response = httpx.post(
        f"{stack.url}/tasks", data={"name": "uploaded"}, files={"file": ("t.jsonl", content)}
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "file line 2: not valid JSON",
        "type": "invalid_request_error",
        "param": "file",
        "code": None,
    }
    good = b'{"prompt": "a", "completion": "b"}\n'
    held = httpx.post(
        f"{stack.url}/tasks",
        data={"name": "uploaded"},
        files={"file": ("t.jsonl", good), "validation_file": ("v.jsonl", b'{"prompt": "a"}\n')},
    )
    assert held.status_code == 400
    assert held.json()["error"]["param"] == "validation_file"
    assert held.json()["error"]["message"].startswith("validation_file line 1: completion")


def test_unknown_job_is_404(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/tasks/job-doesnotexist").status_code == 404


def test_admin_remove_task_then_rollback_changes_what_continual_answers(stack: Stack) -> None:
    adapters = httpx.get(f"{stack.url}/admin/adapters", headers=ADMIN).json()
    assert [t["name"] for t in adapters["tasks"]] == ["codes", "opposites"]
    both = adapters["live_merge"]
    assert accuracy(stack, "continual", TASK_B) >= 0.8

    removed = httpx.delete(f"{stack.url}/admin/tasks/opposites", headers=ADMIN)
    assert removed.status_code == 200, removed.text
    assert "opposites" not in served_models(stack)
    assert accuracy(stack, "continual", TASK_B) < 0.5, "continual still answers the removed task"
    assert accuracy(stack, "continual", TASK_A) >= 0.8

    back = httpx.post(f"{stack.url}/admin/rollback", headers=ADMIN, json={"merge_id": both})
    assert back.status_code == 200, back.text
    assert "opposites" in served_models(stack)
    assert accuracy(stack, "continual", TASK_B) >= 0.8
    ledger = stack.ledger()
    changes = [e["op"] for e in ledger if e["op"] != "audit"]
    assert changes[-4:] == ["remove_task", "set_live", "rollback", "set_live"]
    audits = [(e["action"], e["target"]) for e in ledger if e["op"] == "audit"]
    assert audits[-2:] == [("remove_task", "opposites"), ("rollback", both)]


def test_admin_errors(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/admin/adapters").status_code == 401
    assert (
        httpx.get(f"{stack.url}/admin/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 403
    )
    missing = httpx.delete(f"{stack.url}/admin/tasks/ghost", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    bad = httpx.post(f"{stack.url}/admin/rollback", headers=ADMIN, json={"merge_id": "m999"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "merge_id"


def test_admin_stats_as_json_and_png(stack: Stack) -> None:
    stats = httpx.get(f"{stack.url}/admin/stats", headers=ADMIN, timeout=60).json()
    assert stats["tasks"] == ["codes/v1", "opposites/v1"]
    aggregate = stats["aggregate"]
    assert len(aggregate["cr_dw"]) == 2 and len(aggregate["oo"]) == 2
    assert 0 < aggregate["occupancy"] <= 1
    png = httpx.get(f"{stack.url}/admin/stats.png", headers=ADMIN, timeout=60)
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert httpx.get(f"{stack.url}/admin/stats").status_code == 401


# Last in the module: these add tasks to the store the tests above inspect.
TASK_C = [
    (f"Locker {n} holds a", f" {thing}")
    for n, thing in zip(
        range(101, 109), ["cup", "pen", "hat", "key", "box", "map", "egg", "bag"], strict=True
    )
]


def test_a_task_posted_without_hyperparameters_learns_and_says_how_well(stack: Stack) -> None:
    response = service_stack.post_task(stack, "lockers", TASK_C, METHOD, {})
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["train_accuracy"] >= 0.9 and job["warnings"] == []
    assert "held_out_accuracy" not in job["metrics"]  # 8 examples: too few to hold any out
    chosen = job["hyperparameters"]
    assert chosen["steps"] == job["metrics"]["auto/steps"] and chosen["learning_rate"] > 0
    wait_until_served(stack, job["merge_id"])
    assert accuracy(stack, "lockers", TASK_C) >= 0.9
    # The check before the publish scored every live task and the base's general answers: the
    # row is the accuracy matrix's last, in /admin/stats (each version's row, oldest first).
    assert job["metrics"]["general_agreement"] >= 97 and job["metrics"]["regression_seconds"] > 0
    matrix = httpx.get(f"{stack.url}/admin/stats", headers=ADMIN, timeout=60).json()["accuracy_matrix"]
    assert [entry["after"] for entry in matrix] == ["codes/v1", "opposites/v1", "lockers/v1"]
    assert set(matrix[-1]["row"]) == {"codes", "opposites", "lockers"}
    assert min(matrix[-1]["row"].values()) >= 80 and matrix[-1]["delta"]["codes"] >= -2
    assert matrix[-1]["general"]["agreement"] == job["metrics"]["general_agreement"]


def test_a_task_that_did_not_learn_succeeds_with_a_warning(stack: Stack) -> None:
    # Facts no earlier task taught (a routing slip to an earlier task would answer TASK_B's).
    fresh = [
        (f"Shelf {n} holds a", f" {thing}")
        for n, thing in zip(range(201, 207), ["fig", "jar", "mug", "pot", "lid", "rug"], strict=True)
    ]
    response = service_stack.post_task(stack, "one-step", fresh, METHOD, {"steps": 1})
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["train_accuracy"] < 0.5
    assert len(job["warnings"]) == 1 and "did not learn" in job["warnings"][0]
    assert "did not learn" in (stack.home / "worker.log").read_text()


def test_a_plugins_regularizer_trains_through_post_tasks(stack: Stack) -> None:
    """tests/plugins/toy_method.py registers a regularizer (with its λ knob) and a preset in one
    module; the server validates its knob and the worker trains with it."""
    facts = [
        (f"Box {n} holds a", f" {thing}")
        for n, thing in zip(range(301, 305), ["cup", "pen", "key", "hat"], strict=True)
    ]
    hyperparameters = {"steps": 4, "toy_ridge_lambda": 0.01}
    response = service_stack.post_task(stack, "ridge", facts, METHOD, hyperparameters)
    assert response.status_code == 202, response.text
    job = wait_for(stack, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["lambda/toy-ridge"] == 0.01
    assert job["metrics"]["regularizer/toy-ridge"] > 0, "the worker computed the plugin's term"
    bad = service_stack.post_task(stack, "ridge-2", facts, METHOD, {"toy_ridge_lambda": -1})
    assert bad.status_code == 400  # the knob's bound, at the door
    assert bad.json()["error"]["param"] == "hyperparameters.toy_ridge_lambda"
    other = service_stack.post_task(stack, "ridge-3", facts, "toy-ridge", {})
    assert other.status_code == 409 and other.json()["error"]["param"] == "method"  # known, not this store's
