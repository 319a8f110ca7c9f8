"""The hot-swap sync (server/swap/sync.py, server/swap/engine_adapters.py) against a real adapter store:
which versions go into the engine, when the routes flip, and when a version comes out again.

The engine is a fake at its boundary (add and remove an adapter), which records what it was asked
to hold; the store, its ledger and its PEFT files are real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters_store.store import AdapterStore
from server.engine import AdapterHandle
from server.metrics import LaminaMetrics
from server.swap.engine_adapters import AdapterState
from server.swap.registry import CONTINUAL, ModelNotFound, ModelRegistry
from server.swap.sync import AdapterSync
from tests.support.store import FP, META, make_adapter


class FakeEngine:
    """Holds adapters by id as vLLM does; refuses the names in ``refuse``, and waits on ``gates``
    (name -> event) before it adds one, so a test can act while a sync is half-way."""

    def __init__(self) -> None:
        self.held: dict[int, AdapterHandle] = {}
        self.ids_seen: list[int] = []
        self.refuse: set[str] = set()
        self.fail_removal: set[str] = set()
        self.gates: dict[str, asyncio.Event] = {}

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.name in self.gates:
            await self.gates[adapter.name].wait()
        if adapter.name in self.refuse:
            raise RuntimeError(f"vLLM refused adapter {adapter.name}")
        assert adapter.lora_id not in self.ids_seen, "an id is never given to a second adapter"
        self.ids_seen.append(adapter.lora_id)
        self.held[adapter.lora_id] = adapter

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.name in self.fail_removal:
            self.fail_removal.discard(adapter.name)
            raise RuntimeError("the engine core is busy")
        del self.held[adapter.lora_id]

    def names(self) -> list[str]:
        return sorted(a.name for a in self.held.values())


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store", FP, base_model="tiny-llama")
    store.publish("alpha", make_adapter(0), META, "concat")  # merge m1
    return store


def _sync(store: AdapterStore, engine: FakeEngine, tmp_path: Path) -> AdapterSync:
    return AdapterSync(
        engine,  # type: ignore[arg-type]  # the engine's boundary, see FakeEngine
        ModelRegistry("base"),
        store,
        tmp_path / "cache",
        max_lora_rank=8,
        metrics=LaminaMetrics(),
    )


def _live_merge(store: AdapterStore) -> str:
    live = store.live()
    assert live is not None
    return live.id


def test_a_publish_loads_the_new_versions_flips_the_routes_and_unloads_the_old_merge(
    store: AdapterStore, tmp_path: Path
) -> None:
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    m1 = _live_merge(store)
    asyncio.run(sync.sync())
    assert engine.names() == sorted(["alpha@v1", f"{CONTINUAL}@{m1}"])
    assert sync.registry.resolve(CONTINUAL).adapter == sync.adapters.get(f"{CONTINUAL}@{m1}")
    assert sync.registry.resolve("alpha").adapter == sync.adapters.get("alpha@v1")
    assert {r.state for r in sync.adapters.records()} == {AdapterState.LOADED}
    assert all(r.loaded_at is not None for r in sync.adapters.records())

    store.publish("beta", make_adapter(1), META, "concat")
    m2 = _live_merge(store)
    asyncio.run(sync.sync())
    assert engine.names() == sorted(["alpha@v1", "beta@v1", f"{CONTINUAL}@{m2}"])
    assert sync.registry.resolve(CONTINUAL).adapter == sync.adapters.get(f"{CONTINUAL}@{m2}")
    assert sync.adapters.get(f"{CONTINUAL}@{m1}") is None
    assert sorted(h.name for h in sync.adapters.handles()) == engine.names()
    assert sync.status.live_merge == m2 and sync.status.tasks == ["alpha/v1", "beta/v1"]

    asyncio.run(sync.sync())  # nothing changed: nothing loaded again
    assert len(engine.ids_seen) == 4


def test_an_adapter_a_request_still_holds_stays_loaded_until_the_request_ends(
    store: AdapterStore, tmp_path: Path
) -> None:
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    m1 = _live_merge(store)
    asyncio.run(sync.sync())
    with sync.registry.lease(CONTINUAL) as route:  # a request decoding with continual@m1
        store.publish("beta", make_adapter(1), META, "concat")
        asyncio.run(sync.sync())
        assert sync.registry.resolve(CONTINUAL).adapter != route.adapter  # new requests get m2
        assert f"{CONTINUAL}@{m1}" in engine.names(), "unloaded under a running request"
    asyncio.run(sync._unload_unused())  # what the follower does between store changes
    assert f"{CONTINUAL}@{m1}" not in engine.names()
    assert sync.adapters.get(f"{CONTINUAL}@{m1}") is None


def test_a_version_that_fails_to_load_leaves_the_routes_and_unloads_what_it_loaded(
    store: AdapterStore, tmp_path: Path
) -> None:
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    m1 = _live_merge(store)
    asyncio.run(sync.sync())
    before = sync.registry.resolve(CONTINUAL).adapter

    store.publish("beta", make_adapter(1), META, "concat")
    m2 = _live_merge(store)
    engine.refuse.add(f"{CONTINUAL}@{m2}")  # beta@v1 loads, the new merge does not
    asyncio.run(sync.sync())

    assert sync.status.last_error is not None and "refused" in sync.status.last_error
    assert sync.metrics.registry.get_sample_value("lamina_sync_failures_total") == 1
    assert sync.registry.resolve(CONTINUAL).adapter == before
    with pytest.raises(ModelNotFound):
        sync.registry.resolve("beta")
    assert sync.status.live_merge == m1
    # beta@v1 went in for the failed sync; no route took it, so the sync's sweep took it out
    assert engine.names() == sorted(["alpha@v1", f"{CONTINUAL}@{m1}"])
    assert sync.adapters.get(f"{CONTINUAL}@{m2}") is None and sync.adapters.get("beta@v1") is None

    engine.refuse.clear()
    asyncio.run(sync.sync())  # the next sync serves m2
    assert sync.status.last_error is None and sync.status.live_merge == m2
    assert engine.names() == sorted(["alpha@v1", "beta@v1", f"{CONTINUAL}@{m2}"])


def test_an_adapter_whose_removal_fails_stays_loaded_and_goes_on_the_next_sweep(
    store: AdapterStore, tmp_path: Path
) -> None:
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    m1 = _live_merge(store)
    asyncio.run(sync.sync())
    store.publish("beta", make_adapter(1), META, "concat")
    engine.fail_removal.add(f"{CONTINUAL}@{m1}")
    with pytest.raises(RuntimeError, match="busy"):
        asyncio.run(sync.sync())
    [old] = [r for r in sync.adapters.records() if r.handle.name == f"{CONTINUAL}@{m1}"]
    assert old.state is AdapterState.LOADED and f"{CONTINUAL}@{m1}" in engine.names()
    unloads = sync.metrics.registry.get_sample_value("lamina_adapter_unloads_total")

    asyncio.run(sync._unload_unused())
    assert f"{CONTINUAL}@{m1}" not in engine.names() and sync.adapters.get(f"{CONTINUAL}@{m1}") is None
    assert sync.metrics.registry.get_sample_value("lamina_adapter_unloads_total") == (unloads or 0) + 1


def test_a_sweep_during_a_sync_never_unloads_what_the_sync_loaded_but_has_not_routed_yet(
    store: AdapterStore, tmp_path: Path
) -> None:
    """An admin route's sync and the follower's sweep between store changes run concurrently;
    the sync loads every version before it flips a route, so a sweep in between must wait."""
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    asyncio.run(sync.sync())
    store.publish("beta", make_adapter(1), META, "concat")
    m2 = _live_merge(store)

    async def scenario() -> None:
        gate = engine.gates[f"{CONTINUAL}@{m2}"] = asyncio.Event()
        syncing = asyncio.create_task(sync.sync())
        while "beta@v1" not in engine.names():  # beta is in; the merge's load is held at the gate
            await asyncio.sleep(0.001)
        sweeping = asyncio.create_task(sync._unload_unused())
        await asyncio.sleep(0.01)
        assert "beta@v1" in engine.names(), "the sweep unloaded a version the sync is about to route"
        gate.set()
        await asyncio.gather(syncing, sweeping)

    asyncio.run(scenario())
    assert sync.status.last_error is None
    assert sync.registry.resolve("beta").adapter == sync.adapters.get("beta@v1")
    assert "beta@v1" in engine.names()


def test_loading_a_name_twice_adds_it_once_and_a_refused_load_leaves_no_record(
    store: AdapterStore, tmp_path: Path
) -> None:
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    path = tmp_path / "somewhere"

    async def scenario() -> None:
        first = await sync.adapters.load("x@v1", path)
        assert await sync.adapters.load("x@v1", path) is first
        engine.refuse.add("y@v1")
        with pytest.raises(RuntimeError, match="refused"):
            await sync.adapters.load("y@v1", path)

    asyncio.run(scenario())
    assert engine.names() == ["x@v1"] and [h.name for h in sync.adapters.handles()] == ["x@v1"]
    assert sync.metrics.registry.get_sample_value("lamina_adapter_loads_total") == 1
    assert sync.metrics.registry.get_sample_value("lamina_adapters_loaded") == 1


def test_a_failed_sync_is_retried_with_a_growing_delay_though_the_ledger_does_not_change(
    store: AdapterStore, tmp_path: Path
) -> None:
    """Before, a replica synced only when the ledger changed: one refused load left it serving
    the old merge (and ``/ready`` 200) until the next publish."""
    engine = FakeEngine()
    sync = _sync(store, engine, tmp_path)
    sync.poll_interval_s = 0.02
    m1 = _live_merge(store)
    engine.refuse.add(f"{CONTINUAL}@{m1}")

    async def scenario() -> list[tuple[bool, int]]:
        seen: list[tuple[bool, int]] = []
        following = asyncio.create_task(sync.follow())
        while sync.status.failures_in_a_row < 3:  # nothing changes in the ledger meanwhile
            await asyncio.sleep(0.01)
        seen.append((sync.status.in_step, sync.status.failures_in_a_row))
        engine.refuse.clear()  # the fault passes
        for _ in range(200):
            if sync.status.in_step:
                break
            await asyncio.sleep(0.01)
        seen.append((sync.status.in_step, sync.status.failures_in_a_row))
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        return seen

    assert asyncio.run(scenario()) == [(False, 3), (True, 0)]
    assert sync.status.live_merge == m1 and sync.status.last_error is None
    assert sync.registry.resolve(CONTINUAL).adapter is not None


def test_the_retry_delay_doubles_from_the_poll_interval_up_to_its_ceiling() -> None:
    from server.swap.sync import retry_delay

    assert [retry_delay(0.5, n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(0.5, 20) == 30.0
