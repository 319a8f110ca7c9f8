"""``lamina demo --model``: which model the demo's server and worker get, without downloading a
model or starting vLLM. Only the process starts are replaced (the worker's and the in-process
server's); ``lamina model install`` runs for real, on a catalogue name it refuses or on a copy it
finds installed and verifies."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import server.cli
import server.processes
from server.cli import app
from server.settings import ServerSettings

CATALOGUE_NAME = "smollm2-135m-instruct"


@dataclass
class Started:
    """What the demo would have started: the worker's environment and the server's settings."""

    worker_env: dict[str, str] | None = None
    worker_stopped: bool = False
    server_model: Path | None = None
    server_model_env: str | None = None
    server_port: int | None = None
    calls: list[str] = field(default_factory=list)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Started:
    record = Started()

    class FakeWorker:
        def stop(self, timeout_s: float) -> None:
            record.worker_stopped = True

    def start_worker(env: dict[str, str], log_path: Path | None, **_: object) -> FakeWorker:
        record.calls.append("worker")
        record.worker_env = dict(env)
        return FakeWorker()

    def serve(host: str | None, port: int | None, model: Path | None) -> None:
        import os

        record.calls.append("server")
        record.server_port = port
        record.server_model_env = os.environ.get("LAMINA_MODEL")
        record.server_model = ServerSettings().model  # what the real serve would load

    monkeypatch.setattr(server.processes, "start_worker", start_worker)
    monkeypatch.setattr(server.cli, "serve", serve)
    return record


def run_demo(home: Path, *args: str) -> Result:
    # None: unset during the command and unset again after it (the demo writes both to os.environ)
    env = {"LAMINA_HOME": str(home), "LAMINA_MODEL": None, "LAMINA_PORT": None, "COLUMNS": "200"}
    return CliRunner().invoke(app, ["demo", *args], env=env)


def fake_installed_model(home: Path, name: str) -> Path:
    """What ``lamina model install`` leaves, as far as its check of an installed copy reads it:
    the files and a manifest with their sha256."""
    target = home / "models" / name
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    digest = hashlib.sha256((target / "config.json").read_bytes()).hexdigest()
    (target / "lamina-model.json").write_text(json.dumps({"files": {"config.json": digest}}))
    return target


def test_an_unknown_model_name_is_one_line_naming_the_option(tmp_path: Path, started: Started) -> None:
    result = run_demo(tmp_path / "home", "--model", "no-such-model")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--model no-such-model" in lines[0] and "lamina model list" in lines[0]
    assert started.calls == []  # neither the worker nor the server started


def test_a_catalogue_name_installed_already_is_what_the_worker_and_the_server_get(
    tmp_path: Path, started: Started
) -> None:
    home = tmp_path / "home"
    installed = fake_installed_model(home, CATALOGUE_NAME)
    result = run_demo(home, "--model", CATALOGUE_NAME, "--port", "8123")
    assert result.exit_code == 0, result.output
    assert started.calls == ["worker", "server"]
    assert started.worker_env == {"LAMINA_PORT": "8123", "LAMINA_MODEL": CATALOGUE_NAME}
    assert started.server_model_env == CATALOGUE_NAME and started.server_port == 8123
    assert started.server_model == installed  # the settings resolve the name to the installed copy
    assert started.worker_stopped


def test_a_model_directory_is_used_as_given_without_an_install(tmp_path: Path, started: Started) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    result = run_demo(tmp_path / "home", "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    assert "installing" not in result.output
    assert started.worker_env == {"LAMINA_PORT": "8000", "LAMINA_MODEL": str(model_dir)}
    assert started.server_model_env == str(model_dir)


def test_without_the_option_the_demo_leaves_the_model_to_the_settings(
    tmp_path: Path, started: Started
) -> None:
    result = run_demo(tmp_path / "home")
    assert result.exit_code == 0, result.output
    assert started.worker_env == {"LAMINA_PORT": "8000"}
    assert started.server_model_env is None
