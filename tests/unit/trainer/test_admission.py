"""Whether a task may join a store: checked by the API before queueing and by the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.store import AdapterStore
from server.training.service import ADMISSION_STATUS, admission_refused
from trainer.config import Hyperparameters, resolve_method
from trainer.contract.admission import AdmissionError, AdmissionReason, admit

MODULE = "model.layers.0.self_attn.q_proj"
D_OUT, D_IN, R = 8, 6, 4


def _adapter(mask: torch.Tensor | None = None, seed: int = 0) -> LoraAdapter:
    A = torch.randn(R, D_IN, generator=torch.Generator().manual_seed(0))  # shared A (LoRAF)
    B = torch.randn(D_OUT, R, generator=torch.Generator().manual_seed(seed + 1))
    if mask is not None:
        B = B * mask
    return LoraAdapter(
        {MODULE: LoraModule(A=A, B=B, scale=1.0)}, masks={MODULE: mask} if mask is not None else {}
    )


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path, "fp")


def _reason(store: AdapterStore, name: str, method: str, **hp: object) -> tuple[str, str]:
    with pytest.raises(AdmissionError) as caught:
        admit(store, name, resolve_method(method), Hyperparameters(**hp), max_lora_rank=16)
    return caught.value.reason, caught.value.param


def test_a_fresh_store_admits_a_valid_task_with_its_own_settings(store: AdapterStore) -> None:
    hp = Hyperparameters(r=16, lora_alpha=32, mask_fraction=0.3)
    for method in ("lori-s", "loraf", "inflora"):  # nothing to share or protect yet: nothing changes
        assert admit(store, "first", resolve_method(method), hp, max_lora_rank=16) == hp
    assert _reason(store, "first", "lori-s", r=32) == ("rank_exceeded", "hyperparameters.r")  # 32 > 16 alone


def test_name_duplicate_method_and_rank(store: AdapterStore) -> None:
    store.publish("first", _adapter(), {"method": "inc-lora"}, merge="concat")
    assert _reason(store, "Bad", "inc-lora") == ("invalid_name", "name")
    assert _reason(store, "first", "inc-lora") == ("task_exists", "name")
    assert _reason(store, "second", "lori-s") == ("method_mismatch", "method")
    assert _reason(store, "second", "inc-lora", r=16) == ("rank_exceeded", "hyperparameters.r")  # 4 + 16 > 16
    admit(store, "second", resolve_method("inc-lora"), Hyperparameters(r=12), max_lora_rank=16)


def test_an_imported_first_task_does_not_set_the_stores_method(store: AdapterStore) -> None:
    """Before, an adapter an admin imported into an empty store made its method "import", and
    every later POST /tasks was refused with 409 "use 'import'"."""
    store.publish("imported", _adapter(), {"method": "import"}, merge="concat")
    admit(store, "second", resolve_method("inc-lora"), Hyperparameters(r=4), max_lora_rank=16)
    store.publish("second", _adapter(seed=1), {"method": "inc-lora"}, merge="concat")
    assert _reason(store, "third", "lori-s") == (
        "method_mismatch",
        "method",
    )  # the trained task's method holds


def test_the_server_answers_each_reason_with_the_status_users_saw(store: AdapterStore) -> None:
    """The trainer gives a reason; the server picks the HTTP status (the codes of before the split)."""
    store.publish("first", _adapter(), {"method": "inc-lora"}, merge="concat")
    cases = [("Bad", "inc-lora", {}, 400), ("first", "inc-lora", {}, 409), ("second", "lori-s", {}, 409)]
    cases.append(("second", "inc-lora", {"r": 16}, 409))
    for name, method, hp, status in cases:
        with pytest.raises(AdmissionError) as caught:
            admit(store, name, resolve_method(method), Hyperparameters(**hp), max_lora_rank=16)
        refusal = admission_refused(caught.value)
        assert (refusal.status, refusal.param, refusal.message) == (
            status,
            caught.value.param,
            caught.value.message,
        )
        assert refusal.code == caught.value.reason.value
    assert set(ADMISSION_STATUS) == set(AdmissionReason)  # every reason has a status
    assert ADMISSION_STATUS[AdmissionReason.capacity_exceeded] == 409


def test_loraf_store_refuses_a_task_whose_mask_cannot_fit(store: AdapterStore) -> None:
    mask = torch.zeros(D_OUT, R, dtype=torch.bool)
    mask.view(-1)[:28] = True  # 28 of 32 positions owned, 4 free
    store.publish("first", _adapter(mask), {"method": "loraf"}, merge="sum")
    admit(
        store, "fits", resolve_method("loraf"), Hyperparameters(mask_fraction=0.125), max_lora_rank=16
    )  # needs 4
    status, param = _reason(store, "too-big", "loraf", mask_fraction=0.2)  # needs 6
    assert (status, param) == ("capacity_exceeded", "hyperparameters.mask_fraction")


def test_loraf_admission_needs_the_position_the_trainer_draws(store: AdapterStore) -> None:
    """A mask fraction too small for one position still claims one (loraf_mask_size), so a full
    store refuses the task at the door instead of failing it in the worker."""
    mask = torch.ones(D_OUT, R, dtype=torch.bool)
    mask.view(-1)[0] = False  # 31 of 32 positions owned
    store.publish("first", _adapter(mask), {"method": "loraf"}, merge="sum")
    admit(store, "fits", resolve_method("loraf"), Hyperparameters(mask_fraction=0.01), max_lora_rank=16)
    store.publish("second", _adapter(~mask), {"method": "loraf"}, merge="sum")  # now all 32 owned
    status, param = _reason(store, "full", "loraf", mask_fraction=0.01)  # ⌊0.32⌋ = 0, but needs 1
    assert (status, param) == ("capacity_exceeded", "hyperparameters.mask_fraction")


def test_loraf_store_configured_to_grow_admits_at_a_wider_rank(store: AdapterStore) -> None:
    mask = torch.zeros(D_OUT, R, dtype=torch.bool)
    mask.view(-1)[:28] = True
    store.publish("first", _adapter(mask), {"method": "loraf"}, merge="sum")
    hp = Hyperparameters(mask_fraction=0.2, r=8, lora_alpha=16)  # the store's r=4, scale 1 win
    plan = admit(store, "grows", resolve_method("loraf"), hp, max_lora_rank=16, loraf_grow_rank=4)
    assert (plan.r, plan.lora_alpha) == (R + 4, R + 4), "one more block of 4 ranks at the same scale"
    with pytest.raises(AdmissionError):  # growing past the engine's max rank is refused
        admit(store, "grows", resolve_method("loraf"), hp, max_lora_rank=6, loraf_grow_rank=4)
    no_growth_needed = admit(
        store, "fits", resolve_method("loraf"), Hyperparameters(mask_fraction=0.1), 16, 4
    )
    assert no_growth_needed.r == R


def test_growth_is_recorded_in_the_ledger(store: AdapterStore) -> None:
    store.publish(
        "first", _adapter(), {"method": "inc-lora"}, merge="concat", notes=[{"op": "grow", "rank_to": 8}]
    )
    assert [e["op"] for e in store.ledger()] == ["grow", "add_task", "set_live"]
