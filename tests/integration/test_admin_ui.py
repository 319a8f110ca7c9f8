"""The admin page (``/admin/ui``) in a real browser against the real stack.

Headless Chromium (Debian's, driven by Playwright) opens the page, is refused with a wrong key
and signs in with the right one; a task posted through the API is followed on the page to
``succeeded`` (its loss curve drawn), its row appears in the accuracy heat map; after a second
task, the page's rollback button (confirmed in the browser's dialog) makes the first merge live
again: the page shows it, and ``continual`` no longer answers the second task's prompts.

Without Playwright or Chromium the module is skipped, unless ``LAMINA_REQUIRE_BROWSER=1`` (CI
sets it), where it fails instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support import service_stack
from tests.support.service_stack import (
    CODE_WORDS,
    HYPERPARAMETERS,
    JOB_TIMEOUT_S,
    Stack,
    accuracy,
    require_redis,
    running_stack,
    wait_for,
    wait_until_served,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.engine, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_KEY = "ui-admin-key"
METHOD = "inflora"
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
JOB_TIMEOUT_MS = JOB_TIMEOUT_S * 1000
SWAP_TIMEOUT_MS = 30_000


def _without(reason: str) -> None:
    if os.environ.get("LAMINA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and LAMINA_REQUIRE_BROWSER=1 requires the browser test to run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _without("the playwright package is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _without(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    playwright = sync_playwright().start()
    try:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
        try:
            launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        except Error as error:
            _without(f"Chromium at {CHROMIUM} did not start: {error}")
        yield launched
        launched.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def stack(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_redis()  # the browser first: without one, no stack is started for nothing
    settings = {"LAMINA_DEFAULT_METHOD": METHOD, "LAMINA_ADMIN_KEY": ADMIN_KEY}
    with running_stack(tmp_path_factory.mktemp("lamina-home"), settings) as running:
        yield running


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(base_url=stack.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def _sign_in(page: Page, key: str) -> None:
    page.goto("/admin/ui")
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Use key").click()


def _post(stack: Stack, name: str, examples: list[tuple[str, str]]) -> str:
    response = service_stack.post_task(stack, name, examples, METHOD, HYPERPARAMETERS)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _follow_on_page(page: Page, stack: Stack, job_id: str) -> dict[str, Any]:
    """Watch the job's row go from running to succeeded, then return the job as the API has it."""
    from playwright.sync_api import expect

    row = page.locator(f'#jobs tr[data-job="{job_id}"]')
    expect(row.locator("td.status")).to_have_text(re.compile("queued|validating|running"))
    expect(row.locator("td.status")).to_have_text("running", timeout=JOB_TIMEOUT_MS)
    expect(row.locator("td.status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    job = wait_for(stack, job_id)
    assert job["status"] == "succeeded", job["error"]
    # the last progress and a loss curve of at least two points, drawn from the polls or loss_curve
    progress = job["progress"]
    expect(row.locator("progress")).to_have_attribute("value", str(progress["total"]))
    points = row.locator("svg.curve polyline").get_attribute("points") or ""
    assert len(points.split()) >= 2, points
    return job


def test_a_wrong_key_is_refused_with_the_apis_message(page: Page) -> None:
    from playwright.sync_api import expect

    _sign_in(page, "not-the-key")
    expect(page.get_by_role("alert")).to_have_text("Key refused: this key may not use the admin endpoints.")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('lamina-admin-key')") is None


def test_follow_jobs_and_roll_back_from_the_page(page: Page, stack: Stack) -> None:
    from playwright.sync_api import expect

    assert accuracy(stack, "base", TASK_B) < 0.5, "the base must not know task B already"
    _sign_in(page, ADMIN_KEY)
    expect(page.locator("#live-merge")).to_have_text("none (the base model)")
    assert page.evaluate("sessionStorage.getItem('lamina-admin-key')") == ADMIN_KEY

    job_a = _follow_on_page(page, stack, _post(stack, "codes", TASK_A))
    heatmap = page.locator("#heatmap")
    row_a = heatmap.locator(f'tbody tr[data-after="{job_a["task_version"]}"]')
    expect(row_a.locator('td[data-task="codes"]')).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
    expect(page.locator("#live-merge")).to_have_text(job_a["merge_id"])
    expect(page.locator('#tasks tr[data-task="codes"]')).to_be_visible()

    job_b = _follow_on_page(page, stack, _post(stack, "opposites", TASK_B))
    row_b = heatmap.locator(f'tbody tr[data-after="{job_b["task_version"]}"]')
    expect(row_b.locator('td[data-task="opposites"]')).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
    expect(heatmap.locator("tbody tr")).to_have_count(2)
    expect(page.locator("#live-merge")).to_have_text(job_b["merge_id"])
    assert accuracy(stack, "continual", TASK_B) >= 0.8

    # Roll back to A's merge through the page: a dismissed confirmation changes nothing ...
    rollback = page.get_by_role("button", name=f"Roll back to {job_a['merge_id']}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    rollback.click()
    assert httpx.get(f"{stack.url}/ready").json()["live_merge"] == job_b["merge_id"]
    # ... an accepted one rolls back, and the page shows it
    questions: list[str] = []

    def accept(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    rollback.click()
    expect(page.get_by_role("alert")).to_have_text(f"Rolled back: {job_a['merge_id']} is live.")
    assert questions and job_a["merge_id"] in questions[0]
    expect(page.locator("#live-merge")).to_have_text(job_a["merge_id"], timeout=SWAP_TIMEOUT_MS)
    expect(page.locator(f'#merges tr[data-merge="{job_a["merge_id"]}"]')).to_have_class("live")
    expect(page.locator('#tasks tr[data-task="opposites"]')).to_have_count(0)
    expect(heatmap.locator("tbody tr")).to_have_count(1)

    wait_until_served(stack, job_a["merge_id"])
    assert accuracy(stack, "continual", TASK_B) < 0.5, "continual still answers the rolled-back task"
    assert accuracy(stack, "continual", TASK_A) >= 0.8
