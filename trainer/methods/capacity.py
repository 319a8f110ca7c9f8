"""What a store can still take: the built-in parts' capacity checks and the ledger notes they lead to.

The catalogue (:mod:`trainer.methods.builtin`) names these functions; admission
(:func:`trainer.contract.admission.admit`) calls them through it, by the API before queueing and by the worker
when the task's turn comes. :func:`loraf_mask_size` is the one place LoRAF's per-module mask
size is computed: the trainer draws exactly that many positions, so admission and training agree.
No training code (torch only through the store's tensors).
"""

from __future__ import annotations

import math
from typing import Any

from adapters_store.lora import LoraAdapter
from adapters_store.subspace import free_directions
from trainer.config import Hyperparameters
from trainer.contract.admission import AdmissionError, AdmissionReason, check_concat_rank
from trainer.methods.catalog import CapacityRequest


def loraf_mask_size(mask_fraction: float, d_out: int, rank: int) -> int:
    """k = max(1, ⌊mask_fraction · d_out · rank⌋): the B positions one LoRAF task owns in a module
    (the paper's K = ⌊(1 − s) d₁ r⌋ per matrix; at least one, so every task learns something)."""
    return max(1, math.floor(mask_fraction * d_out * rank))


def concat_rank(request: CapacityRequest[Hyperparameters]) -> Hyperparameters:
    """The concat merge's rank is the sum of the tasks' ranks; the engine serves up to max_lora_rank."""
    hp = request.hp
    check_concat_rank(
        (int(t.meta.get("rank", 0)) for t in request.tasks),
        hp.r,
        request.max_lora_rank,
        "hyperparameters.r",
        "Lower hyperparameters.r, remove a task, or raise LAMINA_MAX_LORA_RANK.",
    )
    return hp


def inflora_free_directions(request: CapacityRequest[Hyperparameters]) -> Hyperparameters:
    """inflora draws the task's r rows of A in the directions no live task's inputs use; a module
    with fewer than r of them left cannot take the task without touching an earlier one."""
    hp = request.hp
    live = request.store.live()
    summary = live.meta.get("subspace") if live is not None else None
    if not summary:
        return hp
    full = [(name, free, d_in) for name, (free, d_in) in free_directions(summary).items() if free < hp.r]
    if full:
        name, free, d_in = min(full, key=lambda item: item[1])
        raise AdmissionError(
            AdmissionReason.capacity_exceeded,
            f"inflora capacity: module {name} has {free} of {d_in} input directions free (the live tasks "
            f"reserve {d_in - free} at energy {summary['energy']}) and this task needs r = {hp.r}. Lower "
            "hyperparameters.r, or start a new store (LAMINA_STORE), where a lower "
            "hyperparameters.subspace_energy leaves room for more tasks. Removing a task does not free "
            "directions.",
            "hyperparameters.r",
        )
    return hp


def loraf_plan(request: CapacityRequest[Hyperparameters]) -> Hyperparameters:
    """LoRAF tasks own disjoint B positions of one shared (A, B). A task takes the store's rank
    and scale; if its mask (:func:`loraf_mask_size` per module) does not fit, the store grows by
    ``grow_rank`` ranks, or the task is refused with 409."""
    hp, grow = request.hp, request.grow_rank
    history = request.store.history()
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
        free, need = d_out * rank - owned, loraf_mask_size(hp.mask_fraction, d_out, rank)
        if free < need:
            short.append((name, free, need, d_out))
    if not short:
        return _with_rank(hp, rank, scale)
    if grow > 0:
        new_rank = rank + grow
        still_short = [
            n
            for n, free, _, d_out in short
            if free + d_out * grow < loraf_mask_size(hp.mask_fraction, d_out, new_rank)
        ]
        if not still_short and new_rank <= request.max_lora_rank and float(scale * new_rank).is_integer():
            return _with_rank(hp, new_rank, scale)
    name, free, need, d_out = short[0]
    raise AdmissionError(
        AdmissionReason.capacity_exceeded,
        f"LoRAF capacity: module {name} has {free} of {d_out * rank} B positions left and this task "
        f"needs {need} (mask_fraction {hp.mask_fraction}). Lower hyperparameters.mask_fraction to at most "
        f"{free / (d_out * rank):.4f}, remove a task (DELETE /admin/tasks/{{name}}), start a new store, or let "
        "the store grow its rank (LAMINA_LORAF_GROW_RANK).",
        "hyperparameters.mask_fraction",
    )


def _with_rank(hp: Hyperparameters, rank: int, scale: float) -> Hyperparameters:
    """The store's rank and scale (alpha = scale · rank keeps every earlier task's ΔW intact)."""
    return hp.model_copy(update={"r": rank, "lora_alpha": round(scale * rank)})


def loraf_growth_notes(history: list[LoraAdapter], hp: Hyperparameters) -> list[dict[str, Any]]:
    """A ledger entry when this LoRAF task widens the store's shared rank."""
    if not history:
        return []
    previous = max(m.rank for adapter in history for m in adapter.modules.values())
    return [{"op": "grow", "rank_from": previous, "rank_to": hp.r}] if hp.r > previous else []
