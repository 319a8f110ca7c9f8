"""Admission, in one place: can this task join this store, and if not, why.

Checked twice: by the API before anything is queued (so the user gets a 4xx at once) and by the
worker when the task's turn comes (the store may have changed since); an adapter an admin imports
meets the same concat rank check. A refusal is an :class:`AdmissionError` with a reason; the
server decides what HTTP status that is (``server/training/service.py``), so no trainer code
speaks HTTP.

What is checked for every task (its name, the store's method) is :func:`admit`'s own; what depends
on the method (a concat merge's rank, LoRAF's free B positions, inflora's free input directions)
is each part's capacity check (:mod:`trainer.methods.capacity`), registered with it in the method
catalogue, which :func:`admit` runs. Imports no training code; it reads the store, so it loads
torch through ``adapters_store``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from adapters_store.store import AdapterStore, InvalidTaskName, check_task_name
from trainer.config import Hyperparameters, MethodSpec
from trainer.methods import catalog

IMPORTED = "import"
"""The method recorded for an adapter imported through ``POST /admin/adapters``: it joins the live
merge and never sets the store's method (:func:`admit`)."""


class AdmissionReason(StrEnum):
    """A refusal's reason; also the ``code`` users see in the error body and on a failed job."""

    invalid_name = "invalid_name"
    task_exists = "task_exists"
    method_mismatch = "method_mismatch"
    rank_exceeded = "rank_exceeded"
    capacity_exceeded = "capacity_exceeded"


@dataclass
class AdmissionError(Exception):
    """Why a task cannot be trained into this store, with the field to blame."""

    reason: AdmissionReason
    message: str
    param: str

    @property
    def code(self) -> str:
        return self.reason.value

    def __str__(self) -> str:
        return self.message


def check_concat_rank(live_ranks: Iterable[int], rank: int, max_lora_rank: int, param: str, fix: str) -> None:
    """The one concat rank check, for a trained task and an imported adapter alike: a concat
    merge's rank is the sum of its tasks' ranks, and the engine serves a LoRA of at most
    ``max_lora_rank``. ``fix`` tells the user what to change (it differs between the two)."""
    total = sum(live_ranks) + rank
    if total > max_lora_rank:
        raise AdmissionError(
            AdmissionReason.rank_exceeded,
            f"the continual concat merge would have rank {total}, above the server's max_lora_rank "
            f"{max_lora_rank}. {fix}",
            param,
        )


def admit(
    store: AdapterStore,
    name: str,
    method: MethodSpec,
    hp: Hyperparameters,
    max_lora_rank: int,
    loraf_grow_rank: int = 0,
) -> Hyperparameters:
    """Raise :class:`AdmissionError` if the task cannot join the store; else return the
    hyper-parameters to train with (a part's capacity check may adjust them: LoRAF tasks take the
    store's shared rank, grown if allowed)."""
    try:
        check_task_name(name)
    except InvalidTaskName:
        raise AdmissionError(
            AdmissionReason.invalid_name,
            "name must match [a-z0-9][a-z0-9_-]{0,63} (lower-case ASCII).",
            "name",
        ) from None
    tasks = store.tasks()
    if any(t.name == name for t in tasks):
        raise AdmissionError(
            AdmissionReason.task_exists, f"a task named {name!r} already exists in this store.", "name"
        )
    # The store's method is its first trained task's: an adapter an admin imported (method
    # "import") joins whatever merge is live and must not make every later POST /tasks a 409.
    trained = [t for t in tasks if t.meta.get("method") != IMPORTED]
    if trained:
        store_method = trained[0].meta.get("method")
        if store_method and store_method != method.name:
            raise AdmissionError(
                AdmissionReason.method_mismatch,
                f"this store's continual adapter is built with method {store_method!r}; a task trained with "
                f"{method.name!r} cannot join it. Use {store_method!r}, or a separate store (LAMINA_STORE).",
                "method",
            )
    for part in catalog.method_parts(method.parametrization, method.merge, method.lambdas(hp)):
        if part.capacity is not None:
            request = catalog.CapacityRequest(store, tasks, hp, max_lora_rank, loraf_grow_rank)
            hp = catalog.resolve(part.capacity)(request)
    return hp
