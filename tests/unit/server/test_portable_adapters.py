"""Every version a store writes loads with ``peft.PeftModel.from_pretrained`` and names its base
model as the user did: task versions, as-learned stacks, LoRA merges and dense merges (through
the rank-R SVD the store writes beside them)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from adapters_store.lora import ADAPTER_CONFIG, LoraAdapter, LoraModule
from adapters_store.merges import DenseDelta
from adapters_store.store import AdapterStore
from server.admin.imports import base_linear_shapes
from server.engine import AdapterHandle
from server.swap.registry import ModelRegistry
from server.swap.sync import AdapterSync
from trainer.base_model.catalog import MANIFEST_NAME
from trainer.contract.settings import LaminaSettings

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, r: int = 4) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name in MODULES:
        d_out, d_in = shapes[name]
        A = torch.randn(r, d_in, generator=generator) * 0.1
        B = torch.randn(d_out, r, generator=generator) * 0.1
        modules[name] = LoraModule(A=A, B=B, scale=2.0)
    return LoraAdapter(modules=modules)


def build_store(root: Path, base_model_dir: Path, merge: str) -> AdapterStore:
    shapes = base_linear_shapes(base_model_dir)
    store = AdapterStore(root, "0123456789abcdef", base_model="lamina-tiny", dense_export_rank=8)
    for seed, name in enumerate(("first", "second")):
        store.publish(name, random_adapter(shapes, seed), {"method": "test"}, merge, as_learned=True)
    return store


def version_dirs(store: AdapterStore) -> list[Path]:
    dirs = []
    for task in store.tasks():
        dirs += [task.path, task.serving_path]
    return dirs + [merge.path for merge in store.merges()]


def peft_deltas(base: PreTrainedModel, directory: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    return {
        name: model.get_submodule(f"base_model.model.{name}").get_delta_weight("default") for name in MODULES
    }


@pytest.mark.parametrize("merge", ["concat", "magnitude"])
def test_every_version_loads_with_peft(
    base: PreTrainedModel, base_model_dir: Path, tmp_path: Path, merge: str
) -> None:
    store = build_store(tmp_path / merge, base_model_dir, merge)
    dirs = version_dirs(store)
    assert len(dirs) == 6  # 2 tasks x (own, as learned) + 2 merges
    for directory in dirs:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        assert config["base_model_name_or_path"] == "lamina-tiny", directory
        expected = LoraAdapter.load_peft(directory).deltas()
        for name, delta in peft_deltas(base, directory).items():
            torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6)


def test_a_dense_merge_holds_its_svd_in_peft_layout(base_model_dir: Path, tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", base_model_dir, "magnitude")
    live = store.live()
    assert live is not None and live.kind == "dense"
    dense = DenseDelta.load(live.path)
    exported, error = dense.to_lora_svd(8)
    assert live.meta["svd_rank"] == 8
    assert live.meta["svd_relative_error"] == pytest.approx(error)
    on_disk = LoraAdapter.load_peft(live.path)
    for name, delta in exported.deltas().items():
        torch.testing.assert_close(on_disk.modules[name].delta(), delta)
    assert isinstance(store.load_merge(live.id), DenseDelta)  # the store still reads it as dense


class RecordingEngine:
    def __init__(self) -> None:
        self.paths: list[str] = []

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        self.paths.append(adapter.path)


def test_the_server_serves_the_stores_export_when_the_rank_matches(
    base_model_dir: Path, tmp_path: Path
) -> None:
    store = build_store(tmp_path / "store", base_model_dir, "magnitude")
    live = store.live()
    assert live is not None
    engine = RecordingEngine()
    same = AdapterSync(engine, ModelRegistry("base"), store, tmp_path / "cache", max_lora_rank=8)  # type: ignore[arg-type]
    asyncio.run(same._load_merge(live))
    assert engine.paths == [str(live.path)]
    assert same.status.svd_relative_error == pytest.approx(live.meta["svd_relative_error"])
    other = AdapterSync(engine, ModelRegistry("base"), store, tmp_path / "cache", max_lora_rank=16)  # type: ignore[arg-type]
    asyncio.run(other._load_merge(live))  # another rank: computed once into the cache, as before
    assert Path(engine.paths[-1]).parent == tmp_path / "cache" / "svd"


def test_settings_keep_the_model_name_as_given(tmp_path: Path) -> None:
    assert LaminaSettings(home=tmp_path).model_name == "lamina-tiny"  # the embedded model
    installed = tmp_path / "models" / "smollm2-135m-instruct"
    installed.mkdir(parents=True)
    (installed / MANIFEST_NAME).write_text("{}")
    settings = LaminaSettings(home=tmp_path, model="smollm2-135m-instruct")
    assert settings.model == installed
    assert settings.model_name == "smollm2-135m-instruct"


def test_an_approximately_served_model_says_so_on_its_card_and_in_metrics(
    base_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a dense merge served as its truncated SVD looked exact everywhere a user looks, and
    the warning was logged only when the cache was empty (never after a restart)."""
    from server.metrics import LaminaMetrics
    from server.openai.router import _card
    from server.swap.registry import CONTINUAL

    store = build_store(tmp_path / "store", base_model_dir, "magnitude")
    live = store.live()
    assert live is not None
    metrics, registry = LaminaMetrics(), ModelRegistry("base")
    for restart in range(2):  # the second sync finds everything cached, as after a restart
        caplog.clear()
        sync = AdapterSync(
            RecordingEngine(), registry, store, tmp_path / "cache", max_lora_rank=8, metrics=metrics
        )  # type: ignore[arg-type]
        asyncio.run(sync.sync())
        assert "served approximately" in caplog.text, restart
    expected = pytest.approx(live.meta["svd_relative_error"])
    route = registry.resolve(CONTINUAL)
    assert route.relative_error == expected

    from types import SimpleNamespace

    settings = SimpleNamespace(model=base_model_dir, max_model_len=512)
    state = SimpleNamespace(settings=settings, registry=registry)
    request = SimpleNamespace(app=SimpleNamespace(state=state))  # what _card reads of a request
    card = _card(request, route)  # type: ignore[arg-type]
    assert card.exact is False and card.relative_error == expected
    base_card = _card(request, registry.resolve("base"))  # type: ignore[arg-type]
    assert base_card.exact is True and base_card.relative_error is None
    gauge = metrics.registry.get_sample_value
    assert gauge("lamina_served_model_relative_error", {"model": CONTINUAL}) == expected
    assert gauge("lamina_served_model_relative_error", {"model": "base"}) == 0.0
