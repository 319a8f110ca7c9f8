"""The server's cache of derived adapters (server/swap/weights.py, server/swap/sync.py) is keyed by
what the versions hold, never by their ids: merge ids restart at ``m1`` in every store, so a user
who starts over with a new ``LAMINA_STORE`` under the same ``LAMINA_HOME`` once got the old
store's correction as ``base``. The store, its PEFT files and the corrections are real; the
engine is not needed to build a correction."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters_store.lora import LoraAdapter
from adapters_store.store import AdapterStore
from server.swap.registry import ModelRegistry
from server.swap.weights import SUMMARY_FILE, WeightsServing, correction_cache_path
from tests.support.store import FP, META, make_adapter


def _store(root: Path, seed: int) -> AdapterStore:
    store = AdapterStore(root, FP, base_model="tiny-llama")
    store.publish("alpha", make_adapter(seed), META, "concat")  # merge m1 in every store
    return store


def _serving(home: Path) -> WeightsServing:
    return WeightsServing(
        engine=None,  # type: ignore[arg-type]  # building a correction never touches the engine
        registry=ModelRegistry("base"),
        base_model_dir=home / "model",
        cache_dir=home / "cache",
        max_lora_rank=8,
        drain_s=1.0,
        base_model="tiny-llama",
    )


def _base_correction(serving: WeightsServing, store: AdapterStore) -> dict[str, torch.Tensor]:
    live = store.live()
    assert live is not None
    path, summary = serving._correction(live, "base", None, LoraAdapter.load_peft(live.path))
    assert path is not None and summary["exact"]
    return LoraAdapter.load_peft(path).deltas()


def test_base_under_a_second_store_is_corrected_by_that_store_s_merge_not_the_first_one_s(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    first, second = _store(home / "store-a", seed=0), _store(home / "store-b", seed=1)
    serving = _serving(home)
    _base_correction(serving, first)  # cached under the shared home
    fix = _base_correction(serving, second)
    live_delta = LoraAdapter.load_peft(second.live().path).deltas()  # type: ignore[union-attr]
    for module, delta in live_delta.items():  # base = (W0 + ΔW_live) + correction
        torch.testing.assert_close(fix[module], -delta, atol=1e-5, rtol=1e-4)


def test_a_version_keeps_its_cache_entry_across_restarts_and_other_stores_get_their_own(
    tmp_path: Path,
) -> None:
    first, other = _store(tmp_path / "a", seed=0), _store(tmp_path / "b", seed=0)  # same adapter
    reopened = AdapterStore(tmp_path / "a", FP, base_model="tiny-llama")  # a server restart
    cache = tmp_path / "cache"
    paths = [correction_cache_path(cache, s.live(), None, 8) for s in (first, reopened, other)]  # type: ignore[arg-type]
    assert paths[0] == paths[1], "a restart must find what it cached"
    assert paths[0] != paths[2], "another store's m1 is another merge (its files differ, if only by date)"
    task_paths = {correction_cache_path(cache, first.live(), t, 8) for t in first.tasks()}  # type: ignore[arg-type]
    assert task_paths.isdisjoint(paths)


def test_a_failed_write_leaves_no_temporary_directory_and_no_cached_entry(
    tmp_path: Path, monkeypatch
) -> None:
    store, serving = _store(tmp_path / "store", seed=0), _serving(tmp_path)
    live = store.live()
    assert live is not None

    def disk_full(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LoraAdapter, "save_peft", disk_full)
    try:
        serving._correction(live, "base", None, LoraAdapter.load_peft(live.path))
    except OSError:
        pass
    else:
        raise AssertionError("a write that fails must raise")
    left = list((tmp_path / "cache").rglob("*"))
    assert [p for p in left if p.is_file()] == []
    assert not any(p.name.startswith(".") for p in left), f"temporary directories left: {left}"
    assert not any((p / SUMMARY_FILE).exists() for p in left)


def test_corrections_of_merges_no_longer_live_are_evicted_once_stale(tmp_path: Path) -> None:
    import os
    import time

    from server.swap.weights import evict_corrections

    root = tmp_path / "corrections"
    live, old, recent = root / "m3-aaaa", root / "m1-bbbb", root / "m2-cccc"
    for entry in (live, old, recent):
        (entry / "base-r8").mkdir(parents=True)
    hour_ago = time.time() - 7200
    for entry in (live, old):
        os.utime(entry, (hour_ago, hour_ago))
    assert evict_corrections(root, keep=live) == [old]  # another replica may still use m2
    assert sorted(p.name for p in root.iterdir()) == ["m2-cccc", "m3-aaaa"]
