"""Lamina's Prometheus metrics without the engine: ``/metrics`` behind the admin key, jobs and
training seconds read from the job board, and what a hot-swap counts and sets (adapter loads
and unloads, swaps, publish→live latency, subspace and mask occupancy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.stats_cache import stats_for_store
from adapters_store.store import AdapterStore
from adapters_store.subspace import Subspace
from server.app import create_app
from server.engine import AdapterHandle
from server.metrics import LaminaMetrics
from server.settings import ServerSettings
from server.swap.registry import ModelRegistry
from server.swap.sync import AdapterSync
from trainer.config import Example
from trainer.contract.board import JobBoard, JobStatus

ADMIN = "metrics-admin-key"
MODULE = "model.layers.0.self_attn.q_proj"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, keyed by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g), scale=1.0)
    return LoraAdapter({MODULE: module})


def _subspace(k: int) -> Subspace:
    basis, _ = torch.linalg.qr(torch.randn(6, k, generator=torch.Generator().manual_seed(k)))
    return Subspace({MODULE: basis}, energy=0.99)


def test_metrics_need_the_admin_key_and_count_jobs_by_status(base_model_dir: Path, tmp_path: Path) -> None:
    settings = ServerSettings(model=base_model_dir, home=tmp_path, admin_key=ADMIN)
    with TestClient(create_app(settings, start_engine=False)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403

        board = JobBoard(settings.store_dir)
        examples = [Example("a", "b")]
        done = board.create("alpha", "inflora", {}, examples)
        board.update(done.id, status=JobStatus.succeeded, metrics={"seconds": 12.5})
        failed = board.create("beta", "lori-s", {}, examples)
        board.update(failed.id, status=JobStatus.failed, metrics={"seconds": 2.0})
        refused = board.create("delta", "lori-s", {}, examples)
        board.update(
            refused.id, status=JobStatus.failed, error={"message": "forgets", "code": "would_forget"}
        )
        board.create("gamma", "inflora", {}, examples)

        response = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert found[("lamina_jobs", (("status", "queued"),))] == 1
    assert found[("lamina_jobs", (("status", "succeeded"),))] == 1
    assert found[("lamina_jobs", (("status", "failed"),))] == 2
    assert found[("lamina_publishes_refused_total", ())] == 1
    assert found[("lamina_jobs", (("status", "running"),))] == 0
    assert found[("lamina_training_seconds_total", (("method", "inflora"),))] == 12.5
    assert found[("lamina_training_seconds_total", (("method", "lori-s"),))] == 2.0
    assert ("lamina_requests_total", ()) not in found  # no request answered yet: no series


def test_metrics_are_closed_without_an_admin_key(base_model_dir: Path, tmp_path: Path) -> None:
    settings = ServerSettings(model=base_model_dir, home=tmp_path)
    with TestClient(create_app(settings, start_engine=False)) as client:
        assert client.get("/metrics").status_code == 403


class FakeEngine:
    """What AdapterSync asks of the engine, recorded instead of done."""

    def __init__(self) -> None:
        self.loaded: dict[int, str] = {}

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        self.loaded[adapter.lora_id] = adapter.name

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        del self.loaded[adapter.lora_id]


def test_a_hot_swap_counts_loads_unloads_and_latency_and_sets_occupancy(
    base_model_dir: Path, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "store", fingerprint_model(base_model_dir))
    store.publish("alpha", _adapter(0), {"method": "inflora"}, merge="concat", subspace=_subspace(2))
    metrics = LaminaMetrics()
    engine = FakeEngine()
    sync = AdapterSync(
        engine,  # type: ignore[arg-type]
        ModelRegistry("base"),
        store,
        cache_dir=tmp_path / "cache",
        max_lora_rank=8,
        metrics=metrics,
    )

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    asyncio.run(sync.sync())  # start-up: loads alpha and continual@m1, swaps nothing
    assert value("lamina_adapter_loads_total") == 2 and value("lamina_adapters_loaded") == 2
    assert value("lamina_hot_swaps_total") == 0
    assert value("lamina_publish_to_live_seconds_count") == 0
    assert value("lamina_subspace_occupancy", module=MODULE) == pytest.approx(2 / 6)
    assert value("lamina_subspace_free_directions_min") == 4

    assert value("lamina_general_agreement_percent") != value(
        "lamina_general_agreement_percent"
    )  # NaN: not scored
    checked = {"row": {"alpha": 90.0, "beta": 100.0}, "general": {"agreement": 98.0, "n": 100}}
    store.publish(
        "beta",
        _adapter(1),
        {"method": "inflora", "evaluation": checked},
        merge="concat",
        subspace=_subspace(3),
    )
    asyncio.run(sync.sync())  # beta and continual@m2 in, continual@m1 out
    assert value("lamina_task_accuracy_percent", task="alpha") == 90.0
    assert value("lamina_task_accuracy_percent", task="beta") == 100.0
    assert value("lamina_general_agreement_percent") == 98.0
    assert value("lamina_adapter_loads_total") == 4
    assert value("lamina_adapter_unloads_total") == 1
    assert value("lamina_adapters_loaded") == 3 == len(engine.loaded)
    assert value("lamina_hot_swaps_total") == 1
    assert value("lamina_publish_to_live_seconds_count") == 1
    assert 0 <= (value("lamina_publish_to_live_seconds_sum") or -1) < 60
    assert value("lamina_subspace_occupancy", module=MODULE) == pytest.approx(3 / 6)
    assert value("lamina_subspace_occupancy_max") == pytest.approx(3 / 6)

    asyncio.run(sync.sync())  # nothing changed: no swap
    assert value("lamina_hot_swaps_total") == 1

    async def scrape_twice() -> None:  # the first scrape starts the computation, never waits
        metrics.refresh_mask_occupancy(store)
        assert metrics._stats_task is not None
        await metrics._stats_task
        metrics.refresh_mask_occupancy(store)  # known for m2: nothing started again
        assert metrics._stats_task.done()

    asyncio.run(scrape_twice())
    expected = stats_for_store(store)["aggregate"]["occupancy"]
    assert expected is not None and value("lamina_mask_occupancy") == pytest.approx(expected)
