"""Can this task join this store? Checked twice: by the API before anything is queued (so the
user gets a 4xx at once) and by the worker when the task's turn comes (the store may have
changed since). Imports no training code. A refusal is an :class:`AdmissionError` with a
reason (:mod:`trainer.contract.admission`); the server maps reasons to HTTP statuses.

What is checked for every task (its name, the store's method) lives here; what depends on the
method (a concat merge's rank, LoRAF's free B positions, inflora's free input directions) is
each part's capacity check, registered with it in :mod:`trainer.methods.catalog`."""

from __future__ import annotations

from adapters_store.store import AdapterStore, InvalidTaskName, check_task_name
from trainer.config import Hyperparameters, MethodSpec
from trainer.contract.admission import IMPORTED, AdmissionError, AdmissionReason
from trainer.methods import catalog

__all__ = ["AdmissionError", "AdmissionReason", "admit"]


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
