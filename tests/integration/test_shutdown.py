"""Ctrl-C on ``lamina serve`` stops vLLM's engine-core and worker processes too."""

from __future__ import annotations

import psutil
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine


def test_ctrl_c_leaves_no_orphan_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server({}, tmp_path / "server.log")
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert children, "vLLM should run its engine in child processes"
    survivors = stop_server(server)
    assert survivors == [], f"still running after Ctrl-C: {survivors}"
    assert server.process.returncode is not None
    assert "Application shutdown complete" in server.log_path.read_text()
