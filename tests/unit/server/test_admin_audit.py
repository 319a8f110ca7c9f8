"""Every admin change (import, task removal, rollback) is written to the store's ledger with its
time and the admin key's fingerprint, never the key, and listed by GET /admin/adapters; refused
actions (unknown target, damaged version) change nothing and record nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapters_store.lora import LoraAdapter, LoraModule
from server.admin.imports import base_linear_shapes
from server.app import create_app
from server.settings import ServerSettings

ADMIN = "audit-admin-key-which-must-never-be-written"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
FINGERPRINT = hashlib.sha256(ADMIN.encode()).hexdigest()[:12]


@pytest.fixture
def client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path, admin_key=ADMIN, max_lora_rank=8)
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


@pytest.fixture
def peft_files(base_model_dir: Path, tmp_path: Path) -> dict:
    """A rank-2 LoRA on the base's q_proj layers, in PEFT's layout, as an admin would upload it."""
    shapes = {
        name: shape for name, shape in base_linear_shapes(base_model_dir).items() if name.endswith("q_proj")
    }
    g = torch.Generator().manual_seed(0)
    adapter = LoraAdapter(
        {
            name: LoraModule(
                A=torch.randn(2, d_in, generator=g), B=torch.randn(d_out, 2, generator=g), scale=1.0
            )
            for name, (d_out, d_in) in shapes.items()
        }
    )
    directory = tmp_path / "upload"
    directory.mkdir()
    adapter.save_peft(directory, base_model="embedded")
    return {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
    }


def ledger(client: TestClient) -> list[dict]:
    path = client.app.state.store.root / "ledger.jsonl"  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_admin_actions_are_audited_with_a_key_fingerprint(client: TestClient, peft_files: dict) -> None:
    for name in ("first", "second"):
        response = client.post("/admin/adapters", data={"name": name}, files=peft_files, headers=HEADERS)
        assert response.status_code == 201, response.text
    assert client.delete("/admin/tasks/first", headers=HEADERS).status_code == 200
    assert client.post("/admin/rollback", json={"merge_id": "m2"}, headers=HEADERS).status_code == 200
    # refused actions change nothing and are not recorded
    assert client.delete("/admin/tasks/ghost", headers=HEADERS).status_code == 404
    assert client.post("/admin/rollback", json={"merge_id": "m99"}, headers=HEADERS).status_code == 404

    listed = client.get("/admin/adapters", headers=HEADERS).json()
    audit = listed["audit"]
    assert [(e["action"], e["target"]) for e in audit] == [
        ("import", "first"),
        ("import", "second"),
        ("remove_task", "first"),
        ("rollback", "m2"),
    ]
    assert {e["key"] for e in audit} == {FINGERPRINT}
    assert all(e["ts"] and e["seq"] for e in audit)
    assert listed["live_merge"] == "m2" and [t["name"] for t in listed["tasks"]] == ["first", "second"]

    # each audit entry sits in the same append as the change it records, just before it
    entries = ledger(client)
    for entry in audit:
        following = entries[entries.index(entry) + 1]
        assert following["ts"] == entry["ts"]
        assert following["op"] in {"add_task", "remove_task", "rollback"}
    store_text = "".join(
        p.read_text(errors="ignore") for p in client.app.state.store.root.rglob("*") if p.is_file()
    )  # type: ignore[attr-defined]
    assert ADMIN not in store_text


def test_a_rollback_to_a_damaged_version_is_a_409_and_not_audited(
    client: TestClient, peft_files: dict
) -> None:
    for name in ("first", "second"):
        client.post("/admin/adapters", data={"name": name}, files=peft_files, headers=HEADERS)
    weights = client.app.state.store.root / "merges/m1/adapter_model.safetensors"  # type: ignore[attr-defined]
    weights.write_bytes(weights.read_bytes()[:-8])
    before = ledger(client)

    response = client.post("/admin/rollback", json={"merge_id": "m1"}, headers=HEADERS)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "corrupt_version" and error["param"] == "merge_id"
    assert "merge m1: adapter_model.safetensors" in error["message"]
    assert ledger(client) == before


def test_a_removal_whose_remerge_fails_is_a_409_not_a_missing_task(
    client: TestClient, peft_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters_store.merges import MergeError

    assert (
        client.post("/admin/adapters", data={"name": "first"}, files=peft_files, headers=HEADERS).status_code
        == 201
    )

    def refuse_merge(name: str, notes: object = None) -> None:
        raise MergeError("overlapping masks in q_proj")

    monkeypatch.setattr(client.app.state.store, "remove_task", refuse_merge)  # type: ignore[attr-defined]
    response = client.delete("/admin/tasks/first", headers=HEADERS)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "merge_failed" and "overlapping masks" in error["message"]


def test_an_action_this_replica_could_not_serve_is_a_503_that_says_it_is_in_the_store(
    client: TestClient, peft_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the removal answered 200 while this replica kept serving the removed task."""
    for name in ("first", "second"):
        client.post("/admin/adapters", data={"name": name}, files=peft_files, headers=HEADERS)

    async def engine_refuses() -> None:
        raise RuntimeError("vLLM refused the new merge")

    engine = client.app.state.engine  # type: ignore[attr-defined]
    monkeypatch.setattr(type(engine), "ready", property(lambda self: True))  # as once vLLM has loaded
    monkeypatch.setattr(client.app.state.sync, "_sync", engine_refuses)  # type: ignore[attr-defined]
    response = client.delete("/admin/tasks/first", headers=HEADERS)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "not_served_yet"
    assert "removed task 'first' in the store" in error["message"] and "vLLM refused" in error["message"]
    assert "retries in" in error["message"]
    assert "remove_task" in [e["op"] for e in ledger(client)[-3:]]  # the change stands: no need to repeat it


def test_an_import_into_a_store_with_a_damaged_task_is_a_409_naming_it_not_a_500(
    client: TestClient, peft_files: dict
) -> None:
    assert (
        client.post("/admin/adapters", data={"name": "first"}, files=peft_files, headers=HEADERS).status_code
        == 201
    )
    weights = client.app.state.store.root / "tasks/first/v1/adapter_model.safetensors"  # type: ignore[attr-defined]
    weights.write_bytes(weights.read_bytes()[:-8])
    response = client.post("/admin/adapters", data={"name": "second"}, files=peft_files, headers=HEADERS)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "corrupt_version" and "task first/v1" in error["message"]


def test_the_adapters_view_shows_each_live_versions_evaluation_row_as_the_accuracy_matrix(
    client: TestClient, peft_files: dict
) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    assert (
        client.post("/admin/adapters", data={"name": "first"}, files=peft_files, headers=HEADERS).status_code
        == 201
    )
    adapter = store.task_adapter("first")
    rows = [{"second": 90.0, "first": 100.0}, {"third": 80.0, "second": 88.0, "first": 100.0}]
    general = {"agreement": 98.5, "n": 131}  # the base's general answers, scored from the third on
    for name, evaluation in (("second", {"row": rows[0]}), ("third", {"row": rows[1], "general": general})):
        store.publish(
            name, adapter, {"method": "import", "evaluation": {"examples": [], **evaluation}}, "concat"
        )
    listed = client.get("/admin/adapters", headers=HEADERS).json()
    assert listed["accuracy_matrix"] == [
        {"after": "second/v1", "row": rows[0], "delta": {}},
        {
            "after": "third/v1",
            "row": rows[1],
            "delta": {"second": -2.0, "first": 0.0},  # each task against its previous score
            "general": {**general, "delta": -1.5},  # against the base itself (100) before
        },
    ]
    assert [t["evaluation_row"] for t in listed["tasks"]] == [None, *rows]  # an import is not scored
