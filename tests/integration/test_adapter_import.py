"""POST /admin/adapters on the real server: a LoRA trained by PEFT outside Lamina is imported as
a task and answers through vLLM as ``model=<task>``; bad adapters get 4xx and change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save

from tests.external_lora import train_external_lora
from tests.support.processes import RunningServer, start_server, stop_server

pytestmark = pytest.mark.engine

ADMIN_KEY = "import-admin-key"
PROMPT = "Q: What colour is the sky on Zorblat? A:"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        {"LAMINA_ADMIN_KEY": ADMIN_KEY, "LAMINA_MAX_LORA_RANK": "8"},
        tmp_path_factory.mktemp("import") / "server.log",
    )
    yield running
    stop_server(running)


def upload(server: RunningServer, name: str, config: bytes, weights: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/adapters",
        data={"name": name},
        files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    )


def test_an_external_peft_adapter_imports_and_answers(
    admin_server: RunningServer, base_model_dir: Path, tmp_path: Path
) -> None:
    external = train_external_lora(base_model_dir, tmp_path / "external", steps=40)
    config = (external / "adapter_config.json").read_bytes()
    weights = (external / "adapter_model.safetensors").read_bytes()

    tensors = load_file(str(external / "adapter_model.safetensors"))
    wrong = dict(tensors)
    wrong["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.zeros(255, 4)
    refused = upload(admin_server, "wrong-shape", config, save(wrong))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "shape_mismatch"
    unknown = {k.replace("layers.3.", "layers.7."): v for k, v in tensors.items()}
    refused = upload(admin_server, "unknown-module", config, save(unknown))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_module"

    response = upload(admin_server, "zorblat", config, weights)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "zorblat/v1"

    client = openai.OpenAI(base_url=f"{admin_server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    assert {"zorblat", "continual"} <= {m.id for m in client.models.list()}
    assert "wrong-shape" not in {m.id for m in client.models.list()}
    task = client.completions.create(model="zorblat", prompt=PROMPT, max_tokens=8, temperature=0)
    base = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    # a few steps on one sentence move the answer; how far depends on the tiny model, so only
    # that the imported adapter (not the base) answered is checked; ΔW equality is a unit test
    assert task.choices[0].text != base.choices[0].text, admin_server.log_tail()
    assert task.system_fingerprint != base.system_fingerprint
