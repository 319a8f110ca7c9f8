"""Schemathesis fuzzes every operation of the server's own OpenAPI document against a real
server (vLLM engine, store, admin and user keys): whatever it sends, no answer is a 5xx.

It runs schemathesis's own CLI (``schemathesis run``) as a client, bounded to
``MAX_EXAMPLES`` cases per operation and phase, positive and negative, with a fixed seed so a
failure reproduces. Any task the fuzzer manages to post lands in the server's folder queue,
which no worker consumes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.engine, pytest.mark.integration]

MAX_EXAMPLES = 20
SEED = 7
ADMIN_KEY = "fuzz-admin-key"


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"LAMINA_API_KEYS": "fuzz-user-key", "LAMINA_ADMIN_KEY": ADMIN_KEY, "LAMINA_MAX_PENDING_TASKS": "4"}
    running = start_server(env, tmp_path_factory.mktemp("fuzz") / "server.log")
    yield running
    stop_server(running)


def test_no_operation_answers_with_a_server_error(fuzzed_server: RunningServer, tmp_path: Path) -> None:
    # The admin key also passes as a user key, so every operation is reached past its auth
    # check (auth itself is tested in tests/unit/server/test_auth.py).
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{fuzzed_server.url}/openapi.json",
        "--checks=not_a_server_error",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--phases=examples,coverage,fuzzing",
        "--workers=1",
        "--request-timeout=60",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--report=junit",
        f"--report-dir={tmp_path}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        f"schemathesis found server errors:\n{output[-6000:]}\nserver log:\n{fuzzed_server.log_tail()}"
    )
    # it reached the operations' own logic, not only their auth checks
    assert "Authentication failed" not in output, output[-3000:]
