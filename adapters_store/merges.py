"""Merges: how the live task adapters become the one continual model that the server serves.

Each merge is a small function registered by name, so that a method preset
picks its merge with a string and the store never branches on it. Every merge cites the
equation it implements. Notation (docs/methods.md): task t contributes
ΔW_t = s_t · (B_t ⊙ M_t) @ A_t with A_t (r_t, d_in), B_t (d_out, r_t), mask M_t (d_out, r_t)
(all ones when the task has none) and s_t = alpha_t / r_t.

LoRA-producing merges fold every per-task scale (and weight) into B and return scale 1, because
PEFT's layout allows one ``lora_alpha`` per adapter. ``magnitude`` cannot be written as a
low-rank product, so it returns a :class:`DenseDelta`; :meth:`DenseDelta.to_lora_svd` exports a
rank-R approximation of it and reports what that costs.

Everything is computed in fp32 and checked with ``torch.isfinite`` before it is returned:
a NaN that reaches the store would reach every later merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.lowrank import balanced_factors, padded, top_singular

DELTA_FILE = "delta.safetensors"

MergeOutput = Literal["lora", "dense"]


class MergeError(ValueError):
    """The adapters cannot be merged this way (shapes, shared A, overlapping masks, weights)."""


class NonFiniteMerge(MergeError):
    """A merge input or result holds NaN or Inf; nothing is returned so nothing is published."""


@dataclass
class DenseDelta:
    """A merged update that is not low-rank: module name -> fp32 ΔW of shape (d_out, d_in).

    Served by writing W0 + ΔW into the engine, or exported with :meth:`to_lora_svd`. Memory is
    d_out · d_in · 4 bytes per module, so this is meant for the modules a LoRA targets, not a
    whole model.
    """

    deltas: dict[str, torch.Tensor]

    def save(self, directory: Path) -> Path:
        """Write ``delta.safetensors`` into ``directory`` (which must exist); return its path."""
        path = Path(directory) / DELTA_FILE
        save_file(
            {name: delta.float().contiguous() for name, delta in self.deltas.items()},
            str(path),
            metadata={"format": "lamina-dense-delta"},
        )
        return path

    @classmethod
    def load(cls, directory: Path) -> DenseDelta:
        return cls(deltas=load_file(str(Path(directory) / DELTA_FILE)))

    def to_lora_svd(self, rank: int) -> tuple[LoraAdapter, float]:
        """Best rank-``rank`` approximation of every module (Eckart–Young, through
        :func:`adapters_store.lowrank.top_singular`), as one adapter.

        Returns the adapter (scale 1, B = U·√S, A = √S·Vᵀ so neither factor dominates) and the
        relative error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all modules together, computed from the
        discarded energy. Modules whose rank is below ``rank`` are zero-padded so the adapter
        has the single rank PEFT's layout needs.
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        modules: dict[str, LoraModule] = {}
        kept_sq, total_sq = 0.0, 0.0
        for name, delta in self.deltas.items():
            U, S, Vh, rest_sq = top_singular(delta.double(), rank)
            k = min(rank, S.numel())
            B, A = balanced_factors(U, S, Vh, k)
            modules[name] = padded(B, A, rank)
            kept_sq += float((S[:k] ** 2).sum())
            total_sq += float((S**2).sum()) + rest_sq
        error = math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq > 0 else 0.0
        adapter = LoraAdapter(modules=modules)
        check_finite(adapter)
        return adapter, error


MergeResult = LoraAdapter | DenseDelta
MergeFn = Callable[[list[LoraAdapter], list[float], DenseDelta | None], MergeResult]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge and what the store needs to know to call it."""

    name: str
    output: MergeOutput
    fn: MergeFn
    uses_weights: bool = True
    incremental: bool = False  # can fold new adapters into its previous (dense) result


MERGES: dict[str, MergeMethod] = {}


def register_merge(
    name: str, *, output: MergeOutput, uses_weights: bool = True, incremental: bool = False
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(adapters, weights, previous)`` under ``name``."""

    def decorator(fn: MergeFn) -> MergeFn:
        if name in MERGES:
            raise ValueError(f"merge {name!r} is already registered")
        MERGES[name] = MergeMethod(name, output, fn, uses_weights, incremental)
        return fn

    return decorator


def get_merge(name: str) -> MergeMethod:
    try:
        return MERGES[name]
    except KeyError:
        raise MergeError(f"unknown merge {name!r}; known: {sorted(MERGES)}") from None


def build_merge(
    kind: str,
    adapters: list[LoraAdapter],
    weights: list[float] | None = None,
    previous: DenseDelta | None = None,
) -> MergeResult:
    """The one entry point: merge ``adapters`` (oldest first) with the merge named ``kind``.

    ``weights`` (one per adapter, default 1 each) only for merges that use them; ``previous``
    only for incremental merges, which then fold ``adapters`` into it in order.
    """
    method = get_merge(kind)
    if not adapters:
        raise MergeError("nothing to merge")
    if weights is not None and not method.uses_weights:
        raise MergeError(f"merge {kind!r} takes no weights")
    if previous is not None and not method.incremental:
        raise MergeError(f"merge {kind!r} is not incremental; pass every adapter instead of previous")
    w = [1.0] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise MergeError(f"{len(w)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(x) for x in w):
        raise MergeError(f"weights must be finite, got {w}")
    # Inputs too: max-|·| comparisons are False for NaN, so magnitude would silently drop one.
    for i, adapter in enumerate(adapters):
        check_finite(adapter, f"adapter {i}")
    if previous is not None:
        check_finite(previous, "the previous merge")
    result = method.fn(adapters, w, previous)
    check_finite(result)
    return result


def check_finite(result: MergeResult, what: str = "merge") -> None:
    """Raise :class:`NonFiniteMerge` naming the first module that holds NaN or Inf."""
    tensors: dict[str, tuple[torch.Tensor, ...]]
    if isinstance(result, DenseDelta):
        tensors = {name: (delta,) for name, delta in result.deltas.items()}
    else:
        tensors = {name: (m.A, m.B) for name, m in result.modules.items()}
    for name, parts in tensors.items():
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise NonFiniteMerge(f"{what} has NaN/Inf in module {name}")


# --- helpers -------------------------------------------------------------------------------


def _common_modules(adapters: list[LoraAdapter]) -> list[str]:
    """Module names, which must be the same for every adapter (one method per store)."""
    names = sorted(adapters[0].modules)
    for i, adapter in enumerate(adapters[1:], start=1):
        if sorted(adapter.modules) != names:
            raise MergeError(f"adapter {i} targets {sorted(adapter.modules)}, adapter 0 targets {names}")
    return names


def _mask(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """M_t for one module as bool (d_out, r); all ones when the task has no mask."""
    module = adapter.modules[name]
    mask = adapter.masks.get(name)
    if mask is None:
        return torch.ones_like(module.B, dtype=torch.bool)
    if mask.shape != module.B.shape:
        raise MergeError(f"mask of {name} has shape {tuple(mask.shape)}, B has {tuple(module.B.shape)}")
    return mask.bool()


def _scaled_B(adapter: LoraAdapter, name: str, weight: float) -> torch.Tensor:
    """w_t · s_t · (B_t ⊙ M_t) in fp32, shape (d_out, r_t)."""
    module = adapter.modules[name]
    return weight * module.scale * (module.B.float() * _mask(adapter, name))


def _task_delta(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """ΔW_t = s_t · (B_t ⊙ M_t) @ A_t in fp32, shape (d_out, d_in)."""
    return _scaled_B(adapter, name, 1.0) @ adapter.modules[name].A.float()


def _merged_masks(adapters: list[LoraAdapter], name: str, combine: str) -> torch.Tensor | None:
    """Masks of the merged adapter (kept for the stats): None when no task had one."""
    if not any(name in a.masks for a in adapters):
        return None
    masks = [_mask(a, name) for a in adapters]
    if combine == "cat":
        return torch.cat(masks, dim=1)
    union = masks[0].clone()
    for mask in masks[1:]:
        union |= mask
    return union


# --- the merges ----------------------------------------------------------------------------


@register_merge("concat", output="lora")
def concat(adapters: list[LoraAdapter], weights: list[float], previous: DenseDelta | None) -> LoraAdapter:
    """LoRI eq. 5–6: A = vstack(A_t), B = hstack(w_t · s_t · (B_t ⊙ M_t)), scale 1.

    B @ A = Σ_t w_t ΔW_t exactly, at rank Σ_t r_t. Writing w_t on both A and B would weigh each task by w_t², so the weight is applied once, on B.
    """
    modules: dict[str, LoraModule] = {}
    masks: dict[str, torch.Tensor] = {}
    for name in _common_modules(adapters):
        A = torch.cat([a.modules[name].A.float() for a in adapters], dim=0)  # (Σr, d_in)
        B = torch.cat(
            [_scaled_B(a, name, w) for a, w in zip(adapters, weights, strict=True)], dim=1
        )  # (d_out, Σr)
        modules[name] = LoraModule(A=A, B=B, scale=1.0)
        mask = _merged_masks(adapters, name, "cat")
        if mask is not None:
            masks[name] = mask
    return LoraAdapter(modules=modules, masks=masks)


@register_merge("sum", output="lora")
def sum_shared(adapters: list[LoraAdapter], weights: list[float], previous: DenseDelta | None) -> LoraAdapter:
    """LoRAF: one frozen A shared by all tasks and disjoint masks, so Σ_t w_t ΔW_t =
    (Σ_t w_t · s_t · (B_t ⊙ M_t)) @ A is a single rank-r adapter.

    Both premises are checked, not assumed: a different A or an overlapping mask would make
    the sum silently wrong (another task's entries added twice, or a foreign A). A store that
    grew its rank has tasks whose A is a prefix (the first r_t rows) of the widest one; their
    B columns land in the first r_t columns.
    """
    modules: dict[str, LoraModule] = {}
    masks: dict[str, torch.Tensor] = {}
    for name in _common_modules(adapters):
        A = max((a.modules[name] for a in adapters), key=lambda m: m.rank).A.float()  # (r, d_in)
        owned = torch.zeros(adapters[0].modules[name].B.shape[0], A.shape[0], dtype=torch.bool)  # (d_out, r)
        B = torch.zeros_like(owned, dtype=torch.float32)
        for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
            module = adapter.modules[name]
            r = module.rank
            if module.A.shape[1] != A.shape[1] or not torch.equal(module.A.float(), A[:r]):
                raise MergeError(f"sum needs one shared A; adapter {i} has a different A in {name}")
            mask = _mask(adapter, name)
            overlap = int((owned[:, :r] & mask).sum())
            if overlap:
                raise MergeError(
                    f"sum needs disjoint masks; adapter {i} overlaps earlier ones at {overlap} positions of {name}"
                )
            owned[:, :r] |= mask
            B[:, :r] += _scaled_B(adapter, name, w)
        modules[name] = LoraModule(A=A, B=B, scale=1.0)
        if any(name in a.masks for a in adapters):
            masks[name] = owned
    return LoraAdapter(modules=modules, masks=masks)


@register_merge("linear", output="lora")
def linear(adapters: list[LoraAdapter], weights: list[float], previous: DenseDelta | None) -> LoraAdapter:
    """LoRI eq. 8 (Task Arithmetic on the factors): (Σ_t w_t · s_t · (B_t ⊙ M_t)) @ (Σ_t w_t A_t).

    A baseline: besides the w_t² ΔW_t terms it carries the cross terms w_i w_j s_i B_i A_j
    that concat avoids. The factors are added, so every task needs the same rank.
    """
    modules: dict[str, LoraModule] = {}
    for name in _common_modules(adapters):
        ranks = {a.modules[name].rank for a in adapters}
        if len(ranks) != 1:
            raise MergeError(f"linear needs equal ranks, {name} has ranks {sorted(ranks)}")
        pairs = list(zip(adapters, weights, strict=True))
        A = torch.stack([w * a.modules[name].A.float() for a, w in pairs]).sum(dim=0)  # (r, d_in)
        B = torch.stack([_scaled_B(a, name, w) for a, w in pairs]).sum(dim=0)  # (d_out, r)
        modules[name] = LoraModule(A=A, B=B, scale=1.0)
    return LoraAdapter(modules=modules)


def magnitude(previous: DenseDelta | None, new: LoraAdapter) -> DenseDelta:
    """PS-LoRA eq. 5: ΔW_[1:t] = M(ΔW_[1:t-1], ΔW_t), keeping at each position (i, j) the entry of
    larger |·|, the new task's on ties (the paper's ≥).

    Incremental, as the paper's remark says: only the previous merge and the new adapter are
    needed. A module the new task does not target keeps its previous delta.
    """
    deltas = dict(previous.deltas) if previous is not None else {}
    for name in new.modules:
        delta = _task_delta(new, name)  # (d_out, d_in)
        old = deltas.get(name)
        if old is None:
            deltas[name] = delta
            continue
        if old.shape != delta.shape:
            raise MergeError(
                f"{name}: previous merge has shape {tuple(old.shape)}, new ΔW {tuple(delta.shape)}"
            )
        old = old.float()
        deltas[name] = torch.where(delta.abs() >= old.abs(), delta, old)
    return DenseDelta(deltas=deltas)


@register_merge("magnitude", output="dense", uses_weights=False, incremental=True)
def _magnitude_all(
    adapters: list[LoraAdapter], weights: list[float], previous: DenseDelta | None
) -> DenseDelta:
    """Fold the adapters, oldest first, into ``previous`` (or into nothing)."""
    merged = previous
    for adapter in adapters:
        merged = magnitude(merged, adapter)
    assert merged is not None  # build_merge refuses an empty list
    return merged


@register_merge("latest", output="lora", uses_weights=False)
def latest(adapters: list[LoraAdapter], weights: list[float], previous: DenseDelta | None) -> LoraAdapter:
    """SeqLoRA: one adapter trained on task after task, so the newest one is the continual model."""
    newest = adapters[-1]
    return LoraAdapter(modules=dict(newest.modules), masks=dict(newest.masks))
