"""Docker can't run on the CI machines; check what can be checked without it: the Dockerfiles
pass hadolint, the compose files validate against the Compose specification's schema, the
compose wiring, and that the images are built from the repository's own files."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
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
