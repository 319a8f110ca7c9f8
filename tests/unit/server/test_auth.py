"""API keys: user keys guard completions and training, a separate admin key guards /admin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings

USER, ADMIN = "user-key-1", "admin-key-1"


def _client(base_model_dir: Path, home: Path, **settings: object) -> TestClient:
    return TestClient(
        create_app(ServerSettings(model=base_model_dir, home=home, **settings), start_engine=False)
    )


@pytest.fixture
def client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with _client(base_model_dir, tmp_path, api_keys=[USER, "user-key-2"], admin_key=ADMIN) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_user_endpoints_need_a_user_key(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers=bearer("nope")).json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=bearer(USER)).status_code == 200
    assert client.get("/v1/models", headers=bearer("user-key-2")).status_code == 200
    assert client.get("/tasks").status_code == 401
    assert client.get("/tasks", headers=bearer(USER)).status_code == 200
    assert client.get("/v1/models", headers=bearer(ADMIN)).status_code == 200  # admin is a user too


def test_admin_endpoints_need_the_admin_key_not_a_user_key(client: TestClient) -> None:
    assert client.get("/admin/adapters").status_code == 401
    assert client.get("/admin/adapters", headers=bearer(USER)).status_code == 403
    assert client.get("/admin/adapters", headers=bearer(ADMIN.upper())).status_code == 403
    response = client.get("/admin/adapters", headers=bearer(ADMIN))
    assert response.status_code == 200
    assert response.json()["tasks"] == [] and response.json()["live_merge"] is None


def test_health_is_open(client: TestClient) -> None:
    assert client.get("/health").status_code == 200


def test_admin_is_closed_when_no_admin_key_is_set(base_model_dir: Path, tmp_path: Path) -> None:
    with _client(base_model_dir, tmp_path) as open_client:
        assert open_client.get("/v1/models").status_code == 200, "no user keys: open demo"
        response = open_client.get("/admin/adapters", headers=bearer("anything"))
        assert response.status_code == 403 and "LAMINA_ADMIN_KEY" in response.json()["error"]["message"]


def test_keys_never_reach_the_logs_or_the_answers(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    wrong = "wrong-key-that-must-not-echo"
    answers = [
        client.get("/v1/models", headers=bearer(wrong)),
        client.get("/admin/adapters", headers=bearer(USER)),
        client.get("/admin/adapters", headers=bearer(ADMIN)),
        client.post("/tasks", headers=bearer(USER), json={"name": "x"}),
    ]
    shown = caplog.text + "".join(a.text for a in answers) + repr(client.app.state.settings)
    for key in (wrong, USER, ADMIN, "user-key-2"):
        assert key not in shown
