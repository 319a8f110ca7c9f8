"""POST /admin/adapters: a LoRA trained by PEFT outside Lamina is checked against the base model
(module names, lora_A/lora_B shapes, rank) and published as a task; bad adapters get 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save

from server.admin.imports import base_linear_shapes, parse_peft_lora
from server.app import create_app
from server.settings import ServerSettings
from tests.external_lora import train_external_lora

ADMIN = "import-admin-key"


@pytest.fixture(scope="module")
def external(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_external_lora(base_model_dir, tmp_path_factory.mktemp("external"), steps=3)


@pytest.fixture
def client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path, admin_key=ADMIN, max_lora_rank=8)
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


def files(directory: Path, *, config: dict | None = None, tensors: dict | None = None) -> dict:
    config_bytes = (
        json.dumps(config).encode()
        if config is not None
        else (directory / "adapter_config.json").read_bytes()
    )
    weights = save(tensors) if tensors is not None else (directory / "adapter_model.safetensors").read_bytes()
    return {
        "config": ("adapter_config.json", config_bytes),
        "weights": ("adapter_model.safetensors", weights),
    }


def post(client: TestClient, name: str, upload: dict, key: str = ADMIN):  # type: ignore[no-untyped-def]
    return client.post(
        "/admin/adapters", data={"name": name}, files=upload, headers={"Authorization": f"Bearer {key}"}
    )


def test_a_peft_adapter_parses_into_the_same_update(external: Path, base_model_dir: Path) -> None:
    config = json.loads((external / "adapter_config.json").read_text())
    adapter, _ = parse_peft_lora(
        (external / "adapter_config.json").read_bytes(),
        (external / "adapter_model.safetensors").read_bytes(),
        base_linear_shapes(base_model_dir),
        max_lora_rank=8,
    )
    tensors = load_file(str(external / "adapter_model.safetensors"))
    assert adapter.target_modules == ["q_proj", "v_proj"]
    assert len(adapter.modules) == 8  # 4 layers x q, v
    name = "model.layers.1.self_attn.v_proj"
    A = tensors[f"base_model.model.{name}.lora_A.weight"]
    B = tensors[f"base_model.model.{name}.lora_B.weight"]
    expected = config["lora_alpha"] / config["r"] * B @ A  # PEFT's ΔW
    torch.testing.assert_close(adapter.modules[name].delta(), expected)


def test_import_publishes_a_task_and_refuses_it_twice(client: TestClient, external: Path) -> None:
    assert post(client, "zorblat", files(external), key="wrong").status_code == 403
    response = post(client, "zorblat", files(external))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "zorblat/v1" and body["rank"] == 4
    assert body["live_merge"]["parents"] == ["zorblat/v1"]
    listed = client.get("/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [t["name"] for t in listed["tasks"]] == ["zorblat"]
    assert listed["tasks"][0]["method"] == "import"
    again = post(client, "zorblat", files(external))
    assert again.status_code == 409 and again.json()["error"]["code"] == "task_exists"


def _tensors(external: Path) -> dict[str, torch.Tensor]:
    return dict(load_file(str(external / "adapter_model.safetensors")))


def _config(external: Path) -> dict:
    return json.loads((external / "adapter_config.json").read_text())


def test_wrong_shapes_are_refused_naming_the_module(client: TestClient, external: Path) -> None:
    tensors = _tensors(external)
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 255)  # in_features is 256
    response = post(client, "bad-shape", files(external, tensors=tensors))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "shape_mismatch" and "model.layers.2.self_attn.q_proj" in error["message"]
    assert "in_features=256" in error["message"]


def test_an_unknown_module_is_refused(client: TestClient, external: Path) -> None:
    tensors = _tensors(external)
    for part in ("A", "B"):
        old = f"base_model.model.model.layers.0.self_attn.q_proj.lora_{part}.weight"
        tensors[f"base_model.model.model.layers.9.self_attn.q_proj.lora_{part}.weight"] = tensors.pop(old)
    response = post(client, "bad-module", files(external, tensors=tensors))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unknown_module" and "model.layers.9.self_attn.q_proj" in error["message"]


def test_a_lora_on_the_output_layer_is_refused_as_no_server_could_load_it(
    client: TestClient, external: Path
) -> None:
    tensors = _tensors(external)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 8)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(8, 2)
    response = post(client, "with-head", files(external, tensors=tensors))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_module" and "lm_head" in error["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"r": 16}, "config.r"),  # above max_lora_rank 8
        ({"peft_type": "IA3"}, "config.peft_type"),
        ({"use_dora": True}, "config.use_dora"),
        ({"modules_to_save": ["lm_head"]}, "config.modules_to_save"),
        ({"lora_alpha": -1}, "config.lora_alpha"),
    ],
)
def test_unsupported_configs_are_refused(
    client: TestClient, external: Path, change: dict, param: str
) -> None:
    response = post(client, "bad-config", files(external, config={**_config(external), **change}))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_bad_names_and_files_are_refused(client: TestClient, external: Path) -> None:
    assert post(client, "continual", files(external)).status_code == 422
    assert post(client, "Not A Name", files(external)).status_code == 422
    garbage = {**files(external), "weights": ("adapter_model.safetensors", b"not safetensors")}
    assert post(client, "garbage", garbage).json()["error"]["param"] == "weights"
    lora_only_a = {k: v for k, v in _tensors(external).items() if "lora_B" not in k}
    assert post(client, "half", files(external, tensors=lora_only_a)).status_code == 422


def test_an_import_is_checked_against_the_live_model_it_joins(
    base_model_dir: Path, tmp_path: Path, external: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training job publishes between the import's read of the live model and its write: the
    import's checks must run again on the model it actually joins (here: the concat rank no
    longer fits), not publish on what it read before."""
    settings = ServerSettings(model=base_model_dir, home=tmp_path, admin_key=ADMIN, max_lora_rank=8)
    with TestClient(create_app(settings, start_engine=False)) as client:
        store = client.app.state.store  # type: ignore[attr-defined]
        adapter, _ = parse_peft_lora(
            (external / "adapter_config.json").read_bytes(),
            (external / "adapter_model.safetensors").read_bytes(),
            base_linear_shapes(base_model_dir),
            max_lora_rank=8,
        )
        read_live = type(store).snapshot
        raced: list[str] = []

        def snapshot_then_a_job_publishes(self):  # type: ignore[no-untyped-def]
            seen = read_live(self)
            if not raced:  # the import's read; the jobs' own reads go through untouched
                raced.extend(["racer", "racer-2"])
                for name in raced:
                    self.publish(name, adapter, {"method": "lori-d"}, "concat")
            return seen

        monkeypatch.setattr(type(store), "snapshot", snapshot_then_a_job_publishes)
        response = post(client, "zorblat", files(external))
        assert raced == ["racer", "racer-2"]
        # rank 4 alone fits 8; joined with the two racers' rank 4 each it does not
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "rank_exceeded" and "would have rank 12" in error["message"]
        assert [t.name for t in store.tasks()] == ["racer", "racer-2"]
