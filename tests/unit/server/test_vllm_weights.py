"""The vLLM worker extension's module (server/vllm_weights.py): the worker process imports it by
the dotted name the engine passes to vLLM, so that name must lead to the methods the engine calls,
and importing it must not pull the server or heavy libraries into the worker."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from server import vllm_weights

ROOT = Path(__file__).resolve().parents[3]


def test_the_extension_name_leads_to_the_methods_the_engine_calls() -> None:
    module, _, name = vllm_weights.WORKER_EXTENSION.rpartition(".")
    extension = getattr(importlib.import_module(module), name)
    assert callable(getattr(extension, vllm_weights.APPLY_METHOD))
    assert callable(getattr(extension, vllm_weights.PROBE_METHOD))


def test_importing_the_worker_module_loads_no_server_module_and_nothing_heavy() -> None:
    script = "import sys\nimport server.vllm_weights\nprint(' '.join(sys.modules))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(run.stdout.split())
    assert not loaded & {"torch", "vllm", "safetensors", "adapters_store"}
    assert sorted(m for m in loaded if m.startswith("server.")) == ["server.vllm_weights"]
