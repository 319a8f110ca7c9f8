"""The admin page's shell (server/admin/ui.py): public and the same for everyone, while the data
it shows stays behind the admin key. The page in a browser: tests/integration/test_continual_service.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings

ADMIN = "admin-key-1"


@pytest.fixture
def client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path, api_keys=["user-key"], admin_key=ADMIN)
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


def test_the_shell_needs_no_key_and_holds_no_data(client: TestClient) -> None:
    anonymous = client.get("/admin/ui")
    assert anonymous.status_code == 200
    assert anonymous.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in anonymous.headers["content-security-policy"]
    assert client.get("/admin/ui", headers={"Authorization": f"Bearer {ADMIN}"}).text == anonymous.text
    assert client.get("/admin/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/admin/ui/style.css").headers["content-type"].startswith("text/css")
    slash = client.get("/admin/ui/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "/admin/ui"
    # the data it shows is not public
    assert client.get("/admin/adapters").status_code == 401
    assert client.get("/admin/stats").status_code == 401
    assert client.get("/admin/ui/nothing-here").status_code == 404


def test_the_script_writes_data_as_text_only() -> None:
    script = (Path(__file__).parents[3] / "server" / "admin" / "ui" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
