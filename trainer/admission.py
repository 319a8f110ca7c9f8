"""Can this task join this store? Checked twice: by the API before anything is queued (so the
user gets a 4xx at once) and by the worker when the task's turn comes (the store may have
changed since). Imports no training code."""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters_store.store import AdapterStore, InvalidTaskName, check_task_name
from trainer.config import Hyperparameters, MethodSpec


@dataclass
class AdmissionError(Exception):
    """Why a task cannot be trained into this store, with the field to blame."""

    status: int
    message: str
    param: str
    code: str

    def __str__(self) -> str:
        return self.message


def admit(
    store: AdapterStore, name: str, method: MethodSpec, hp: Hyperparameters, max_lora_rank: int
) -> None:
    try:
        check_task_name(name)
    except InvalidTaskName:
        raise AdmissionError(
            400, "name must match [a-z0-9][a-z0-9_-]{0,63} (lower-case ASCII).", "name", "invalid_name"
        ) from None
    tasks = store.tasks()
    if any(t.name == name for t in tasks):
        raise AdmissionError(
            409, f"a task named {name!r} already exists in this store.", "name", "task_exists"
        )
    if tasks:
        store_method = tasks[0].meta.get("method")
        if store_method and store_method != method.name:
            raise AdmissionError(
                409,
                f"this store's continual adapter is built with method {store_method!r}; a task trained with "
                f"{method.name!r} cannot join it. Use {store_method!r}, or a separate store (LAMINA_STORE).",
                "method",
                "method_mismatch",
            )
    if method.merge == "concat":
        rank = sum(int(t.meta.get("rank", 0)) for t in tasks) + hp.r
        if rank > max_lora_rank:
            raise AdmissionError(
                409,
                f"the continual concat merge would have rank {rank}, above the server's max_lora_rank "
                f"{max_lora_rank}. Lower hyperparameters.r, remove a task, or raise LAMINA_MAX_LORA_RANK.",
                "hyperparameters.r",
                "rank_exceeded",
            )
    if method.parametrization == "loraf":
        _check_loraf_capacity(store, hp)


def _check_loraf_capacity(store: AdapterStore, hp: Hyperparameters) -> None:
    """LoRAF tasks own disjoint B positions; refuse a task whose mask cannot fit (per module,
    k = ⌊mask_fraction · d_out · r⌋, as the trainer draws it)."""
    history = store.history()
    if not history:
        return
    for name, module in history[0].modules.items():
        d_out, rank = module.B.shape
        owned = sum(int(task.masks[name].sum()) for task in history if name in task.masks)
        free, need = d_out * rank - owned, math.floor(hp.mask_fraction * d_out * rank)
        if free < need:
            raise AdmissionError(
                409,
                f"LoRAF capacity: module {name} has {free} of {d_out * rank} B positions left and this task "
                f"needs {need} (mask_fraction {hp.mask_fraction}). Lower hyperparameters.mask_fraction to at most "
                f"{free / (d_out * rank):.4f}, remove a task (DELETE /admin/tasks/{{name}}), or start a new store.",
                "hyperparameters.mask_fraction",
                "capacity_exceeded",
            )
