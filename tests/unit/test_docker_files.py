"""Docker can't run on the CI machines; check what can be checked without it: the compose
file's wiring and that the images are built from the repository's own files."""

from __future__ import annotations

from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


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
        assert "USER lamina" in text, f"{name} should not run as root"
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert '".[cpu]"' in cpu and "pip uninstall -y torchvision torchaudio torchcodec" in cpu
    assert '".[gpu]"' in (DOCKER / "Dockerfile.gpu").read_text()
