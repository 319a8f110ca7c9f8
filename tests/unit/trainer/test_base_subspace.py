"""inflora's seed subspace: the base model's own inputs, protected before a store's first task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from trainer.config import Hyperparameters, resolve_method
from trainer.loop import load_base
from trainer.publish import publish_trained, train_for_store
from trainer.served import merge_deltas, merged_into
from trainer.subspace_growth import _through_first_eos, base_subspace, target_names
from trainer.suite.probe import build_probe, probe_accuracy
from trainer.suite.tasks import get_task

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch.set_num_threads(2)
    return load_base(base_model_dir)


def test_target_names_are_the_linears_a_lora_on_those_short_names_adapts(base) -> None:
    model, _ = base
    names = target_names(model, TARGETS)
    layers = model.config.num_hidden_layers
    assert len(names) == 2 * layers
    assert f"model.layers.{layers - 1}.self_attn.v_proj" in names
    assert not any(name.endswith(("k_proj", "o_proj")) for name in names)


def test_the_mask_keeps_each_sample_through_its_first_eos() -> None:
    eos = 9
    sequences = torch.tensor([[1, 5, 9, 9, 9], [1, 5, 6, 7, 8], [1, 9, 9, 9, 9]])
    assert _through_first_eos(sequences, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert _through_first_eos(sequences, None).tolist() == [[1] * 5] * 3


def test_the_seed_is_the_same_for_every_store_and_leaves_room(base) -> None:
    model, tokenizer = base
    names = target_names(model, TARGETS)
    state = torch.random.get_rng_state()
    first = base_subspace(model, tokenizer, names, {}, 0.99, min_free=16)
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling left the caller's RNG alone
    second = base_subspace(model, tokenizer, names, {}, 0.99, min_free=16)
    for name in names:
        assert torch.equal(first.bases[name], second.bases[name])
        k, d_in = first.bases[name].shape[1], first.bases[name].shape[0]
        assert 0 < k <= d_in - 16
        U = first.bases[name]
        assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4)
    tighter = base_subspace(model, tokenizer, names, {}, 0.9, min_free=16)
    assert sum(tighter.dims().values()) < sum(first.dims().values())  # energy is the knob


def test_a_first_task_keeps_what_the_base_model_knew_only_with_the_seed(base, tmp_path: Path) -> None:
    """The embedded model answers its probe (sums, opposites) at base; a topic-label task trained
    with inflora must not turn those answers into labels when the seed protects the base's inputs."""
    model, tokenizer = base
    probe = build_probe(model, tokenizer)
    assert len(probe) >= 5
    train, _ = get_task("topic").split(seed=0, n_train=200, n_test=10)
    method = resolve_method("inflora")
    fingerprint = fingerprint_model(Path(model.name_or_path))
    kept: dict[float, float | None] = {}
    for energy in (0.99, 0.0):
        store = AdapterStore(tmp_path / f"seed-{energy}", fingerprint)
        hp = Hyperparameters(r=8, lora_alpha=16, seed=0, subspace_base_energy=energy)
        trained = train_for_store(model, tokenizer, store, train, method, hp)
        live = publish_trained(store, "topic", train, method, hp, trained).merge
        assert ("subspace_base_reserved_max" in trained.result.metrics) == (energy > 0)
        with merged_into(model, merge_deltas(store.load_merge(live.id))):
            kept[energy] = probe_accuracy(model, tokenizer, probe)
        stored = store.subspace()  # the seed is stored with the first merge, not as a parent
        assert stored is not None and stored.merge_id == live.id
    with_seed, without = kept[0.99], kept[0.0]
    assert with_seed == 1.0
    assert without is not None and without < with_seed


def test_the_seed_is_computed_once_per_base_model_and_read_back_by_a_new_store(
    base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty store's seed depends on the base model and the settings only: the second store
    reads the first one's from the cache instead of sampling again, bit for bit."""
    from trainer import publish

    model, tokenizer = base
    method = resolve_method("inflora")
    hp = Hyperparameters(target_modules=list(TARGETS), r=4)
    first, metrics = publish._seed_subspace(model, tokenizer, method, hp, [], "tiny", tmp_path)
    assert len(list((tmp_path / "seed").iterdir())) == 1
    assert metrics["subspace_base_reserved_max"] > 0

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached seed should have been used")

    monkeypatch.setattr(publish, "base_subspace", no_sampling)
    second, _ = publish._seed_subspace(model, tokenizer, method, hp, [], "tiny", tmp_path)
    assert second.bases.keys() == first.bases.keys()
    assert all(torch.equal(second.bases[n], first.bases[n]) for n in first.bases)
    assert second.energy == first.energy
    with pytest.raises(AssertionError, match="cached seed"):  # another base model: computed anew
        publish._seed_subspace(model, tokenizer, method, hp, [], "other", tmp_path)
