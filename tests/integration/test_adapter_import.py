"""One real server (vLLM engine, store, admin and user keys) for two things:

- ``POST /admin/adapters``: a LoRA trained by PEFT outside Lamina is imported as a task and
  answers through vLLM as ``model=<task>``; bad adapters get 4xx and change nothing;
- then schemathesis fuzzes every operation of the server's own OpenAPI document against it,
  the imported task included: whatever it sends, no answer is a 5xx. It runs schemathesis's own
  CLI (``schemathesis run``) as a client, bounded to ``MAX_EXAMPLES`` cases per operation and
  phase, positive and negative, with a fixed seed so a failure reproduces. Any task the fuzzer
  manages to post lands in the server's folder queue, which no worker consumes.

Sharing the server saves a vLLM start (about 30 s of the suite).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save

from tests.external_lora import train_external_lora
from tests.support.processes import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.engine, pytest.mark.integration]

ADMIN_KEY = "import-admin-key"
MAX_EXAMPLES = 20  # the fuzzer's cases per operation and phase
SEED = 7
PROMPT = "Q: What colour is the sky on Zorblat? A:"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "LAMINA_ADMIN_KEY": ADMIN_KEY,
        "LAMINA_MAX_LORA_RANK": "8",
        # the fuzzer's: user keys (the admin key passes as one too) and a short queue
        "LAMINA_API_KEYS": "fuzz-user-key",
        "LAMINA_MAX_PENDING_TASKS": "4",
    }
    running = start_server(env, tmp_path_factory.mktemp("import") / "server.log")
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


# Last: the fuzzer may leave queued tasks and refused changes behind.
def test_no_operation_answers_with_a_server_error(admin_server: RunningServer, tmp_path: Path) -> None:
    # The admin key also passes as a user key, so every operation is reached past its auth
    # check (auth itself is tested in tests/unit/server/test_auth.py).
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{admin_server.url}/openapi.json",
        "--checks=not_a_server_error",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--phases=examples,coverage,fuzzing",
        "--workers=1",
        "--request-timeout=60",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--report=junit",
        f"--report-dir={tmp_path}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        f"schemathesis found server errors:\n{output[-6000:]}\nserver log:\n{admin_server.log_tail()}"
    )
    # it reached the operations' own logic, not only their auth checks
    assert "Authentication failed" not in output, output[-3000:]
