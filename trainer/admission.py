"""Can this task join this store? Checked twice: by the API before anything is queued (so the
user gets a 4xx at once) and by the worker when the task's turn comes (the store may have
changed since). Imports no training code."""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters_store.store import AdapterStore, InvalidTaskName, check_task_name
from adapters_store.subspace import free_directions
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
    store: AdapterStore,
    name: str,
    method: MethodSpec,
    hp: Hyperparameters,
    max_lora_rank: int,
    loraf_grow_rank: int = 0,
) -> Hyperparameters:
    """Raise :class:`AdmissionError` if the task cannot join the store; else return the
    hyper-parameters to train with (LoRAF tasks take the store's shared rank, grown if allowed)."""
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
        return _loraf_plan(store, hp, max_lora_rank, loraf_grow_rank)
    if method.parametrization == "inflora":
        _check_free_directions(store, hp)
    return hp


def _check_free_directions(store: AdapterStore, hp: Hyperparameters) -> None:
    """inflora draws the task's r rows of A in the directions no live task's inputs use; a module
    with fewer than r of them left cannot take the task without touching an earlier one."""
    live = store.live()
    summary = live.meta.get("subspace") if live is not None else None
    if not summary:
        return
    full = [(name, free, d_in) for name, (free, d_in) in free_directions(summary).items() if free < hp.r]
    if full:
        name, free, d_in = min(full, key=lambda item: item[1])
        raise AdmissionError(
            409,
            f"inflora capacity: module {name} has {free} of {d_in} input directions free (the live tasks "
            f"reserve {d_in - free} at energy {summary['energy']}) and this task needs r = {hp.r}. Lower "
            "hyperparameters.r, or start a new store (LAMINA_STORE), where a lower "
            "hyperparameters.subspace_energy leaves room for more tasks. Removing a task does not free "
            "directions.",
            "hyperparameters.r",
            "capacity_exceeded",
        )


def _loraf_plan(store: AdapterStore, hp: Hyperparameters, max_lora_rank: int, grow: int) -> Hyperparameters:
    """LoRAF tasks own disjoint B positions of one shared (A, B). A task takes the store's rank
    and scale; if its mask (k = ⌊mask_fraction · d_out · r⌋ per module, as the trainer draws
    it) does not fit, the store grows by ``grow`` ranks, or the task is refused with 409."""
    history = store.history()
    if not history:
        return hp
    widest = {
        name: max((t.modules[name] for t in history if name in t.modules), key=lambda m: m.rank)
        for name in history[-1].modules
    }
    rank = max(m.rank for m in widest.values())
    scale = next(iter(widest.values())).scale
    short = []
    for name, module in widest.items():
        d_out = module.B.shape[0]
        owned = sum(int(t.masks[name].sum()) for t in history if name in t.masks)
        free, need = d_out * rank - owned, math.floor(hp.mask_fraction * d_out * rank)
        if free < need:
            short.append((name, free, need, d_out))
    if not short:
        return _with_rank(hp, rank, scale)
    if grow > 0:
        new_rank = rank + grow
        still_short = [
            n
            for n, free, _, d_out in short
            if free + d_out * grow < math.floor(hp.mask_fraction * d_out * new_rank)
        ]
        if not still_short and new_rank <= max_lora_rank and float(scale * new_rank).is_integer():
            return _with_rank(hp, new_rank, scale)
    name, free, need, d_out = short[0]
    raise AdmissionError(
        409,
        f"LoRAF capacity: module {name} has {free} of {d_out * rank} B positions left and this task "
        f"needs {need} (mask_fraction {hp.mask_fraction}). Lower hyperparameters.mask_fraction to at most "
        f"{free / (d_out * rank):.4f}, remove a task (DELETE /admin/tasks/{{name}}), start a new store, or let "
        "the store grow its rank (LAMINA_LORAF_GROW_RANK).",
        "hyperparameters.mask_fraction",
        "capacity_exceeded",
    )


def _with_rank(hp: Hyperparameters, rank: int, scale: float) -> Hyperparameters:
    """The store's rank and scale (alpha = scale · rank keeps every earlier task's ΔW intact)."""
    return hp.model_copy(update={"r": rank, "lora_alpha": round(scale * rank)})
