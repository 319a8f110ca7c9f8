"""The client commands (``lamina train``, ``lamina tasks list|show|cancel``) against the real app
(no engine, no worker) served by uvicorn in a thread, with user keys on; and the one-line
failures: an unreachable server, a refused key, a bad setting."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner, Result

from server.app import create_app
from server.cli import app
from server.settings import ServerSettings
from trainer.contract.board import JobBoard, JobStatus

KEY = "cli-user-key"


@dataclass
class LiveApp:
    url: str
    board: JobBoard


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_app(base_model_dir: Path, tmp_path: Path) -> Iterator[LiveApp]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path / "home", api_keys=[KEY])
    port = _free_port()
    config = uvicorn.Config(create_app(settings, start_engine=False), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the app did not start"
        time.sleep(0.05)
    yield LiveApp(f"http://127.0.0.1:{port}", JobBoard(settings.store_dir))
    server.should_exit = True
    thread.join(timeout=30)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "LAMINA_API_KEY": None, **(env or {})})


def one_line_error(result: Result) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_an_unreachable_server_is_one_line_naming_the_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    for args in (["tasks", "list"], ["tasks", "show", "job-abc"], ["tasks", "cancel", "job-abc"]):
        line = one_line_error(run(*args, "--url", url))
        assert url in line and "cannot reach" in line
    line = one_line_error(run("tasks", "list", "--url", "not a url"))
    assert "not a url" in line


def test_train_posts_with_the_key_and_follows_the_job_until_it_ends(
    live_app: LiveApp, tmp_path: Path
) -> None:
    examples = tmp_path / "opposites.jsonl"
    examples.write_text('{"prompt": "Opposite of hot =", "completion": " cold"}\n')

    refused = one_line_error(run("train", "opposites", str(examples), "--url", live_app.url))
    assert "401" in refused and "LAMINA_API_KEY" in refused
    assert live_app.board.all() == []

    def cancel_when_queued() -> None:  # no worker runs: stand in for a user cancelling it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = live_app.board.all()
            if jobs:
                live_app.board.request_cancel(jobs[0].id)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_when_queued)
    canceller.start()
    result = run("train", "opposites", str(examples), "--url", live_app.url, env={"LAMINA_API_KEY": KEY})
    canceller.join()
    assert result.exit_code == 1 and "cancelled" in result.stdout, result.output
    (job,) = live_app.board.all()
    assert job.name == "opposites" and job.n_examples == 1 and job.status == JobStatus.cancelled


def test_tasks_list_show_and_cancel(live_app: LiveApp) -> None:
    job = live_app.board.create("alpha", "inflora", {}, [])
    key = ("--api-key", KEY)

    listed = run("tasks", "list", "--url", live_app.url, *key)
    assert listed.exit_code == 0, listed.output
    assert job.id in listed.stdout and "alpha" in listed.stdout and "queued" in listed.stdout
    as_json = run("tasks", "list", "--json", "--url", live_app.url, *key)
    assert [j["id"] for j in json.loads(as_json.stdout)] == [job.id]

    live_app.board.update(job.id, worker="w1", lease_expires_at=1e10, generation=3)  # the board's claim
    shown = run("tasks", "show", job.id, "--url", live_app.url, env={"LAMINA_API_KEY": KEY})
    assert shown.exit_code == 0 and json.loads(shown.stdout)["name"] == "alpha"
    claim = {"worker", "lease_expires_at", "generation"}
    assert not claim & set(json.loads(shown.stdout))  # the API shows the job, not the worker's claim
    assert not claim & set(json.loads(as_json.stdout)[0])
    assert live_app.board.get(job.id).generation == 3
    missing = one_line_error(run("tasks", "show", "job-nosuchjob", "--url", live_app.url, *key))
    assert "404" in missing and "job-nosuchjob" in missing

    cancelled = run("tasks", "cancel", job.id, "--url", live_app.url, *key)
    assert cancelled.exit_code == 0 and f"{job.id}: cancelled" in cancelled.stdout
    assert live_app.board.get(job.id).status == JobStatus.cancelled
    done = live_app.board.create("beta", "inflora", {}, [])
    live_app.board.update(done.id, status=JobStatus.succeeded)
    finished = run("tasks", "cancel", done.id, "--url", live_app.url, *key)
    assert finished.exit_code == 0 and f"{done.id}: already succeeded, nothing to cancel" in finished.stdout
    assert live_app.board.get(done.id).status == JobStatus.succeeded


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    line = one_line_error(run("stats", env={"LAMINA_MAX_LORA_RANK": "7", "LAMINA_HOME": str(tmp_path)}))
    assert line.startswith("lamina: LAMINA_MAX_LORA_RANK") and "one of" in line
    line = one_line_error(run("serve", env={"LAMINA_PORT": "eighty", "LAMINA_HOME": str(tmp_path)}))
    assert "LAMINA_PORT" in line
    line = one_line_error(run("worker", env={"LAMINA_JOB_LEASE_S": "-1", "LAMINA_HOME": str(tmp_path)}))
    assert "LAMINA_JOB_LEASE_S" in line
    missing = tmp_path / "no-model"
    line = one_line_error(run("serve", env={"LAMINA_MODEL": str(missing), "LAMINA_HOME": str(tmp_path)}))
    assert line == f"lamina: LAMINA_MODEL: {missing} holds no model (no config.json)"
    assert list(tmp_path.iterdir()) == []
