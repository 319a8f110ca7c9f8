"""A real browser for the admin page's tests: headless Chromium from Debian's packages, driven
by Playwright, and the page steps those tests share.

Without Playwright or Chromium a test that asks for the browser is skipped, unless
``LAMINA_REQUIRE_BROWSER=1`` (CI sets it), where it fails instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.service_stack import JOB_TIMEOUT_S, Stack, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
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


def open_page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh browser context on the stack's server; fails the test if the page's script threw."""
    context = browser.new_context(base_url=stack.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def sign_in(page: Page, key: str) -> None:
    page.goto("/admin/ui")
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Use key").click()


def follow_on_page(page: Page, stack: Stack, job_id: str) -> dict[str, Any]:
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
