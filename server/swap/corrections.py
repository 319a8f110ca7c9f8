"""Correction adapters: every model a user can name, relative to the weights the engine holds.

When the live merge is written into the engine's weights (W = W0 + ΔW_live, so ``continual``
costs nothing per token), ``base`` and each task's model no longer are W0 plus something; they
are W minus something. Each is served as one LoRA, its *correction* C relative to the live merge:

- ``base``: C = −ΔW_live. For a concat merge of rank R that is the merge's own factors with B
  negated (rank R); for a dense merge it is full rank.
- a task's model (its own adapter, or the model as it was learned): C = ΔW_task − ΔW_live,
  whose factors stack to rank r_task + R, and whose real rank is often lower (the live merge
  contains the task, so the shared directions cancel: "minus the tasks after it").

:func:`correction` finds the smallest exact factorization of C (QR of the stacked factors, then
the SVD of the small core: never a d_out × d_in matrix unless a term is dense) and serves it
exactly when its rank fits the engine's ``max_lora_rank``; otherwise it keeps the top
``max_lora_rank`` singular directions (Eckart–Young) and reports the relative error
‖C − C_R‖_F / ‖C‖_F, which the server logs and shows in ``/admin/adapters``.

Singular values below ``TOLERANCE`` of the inputs' scale are fp32 rounding (a task's ΔW as the
merge stored it differs from its own adapter's product in the last bits), not rank: they are
dropped from the rank and from both sides of the error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.lowrank import balanced_factors, factored_svd, padded, top_singular
from adapters_store.merges import DenseDelta

TOLERANCE = 1e-5
"""Relative to Σ‖B_i‖·‖A_i‖ (+ ‖dense‖) of a module's terms: smaller singular values are rounding."""


@dataclass(frozen=True)
class Correction:
    """A model as a LoRA on top of the live weights, and what serving it at a rank costs.

    ``adapter`` is None when the correction is zero (the model *is* the live weights)."""

    adapter: LoraAdapter | None
    rank: int | None  # the correction's numerical rank (what an exact LoRA of it needs); None:
    # above ``served_rank``, not computed (a large dense term, see :func:`top_singular`)
    served_rank: int  # the rank of ``adapter`` (<= the max_rank asked for)
    relative_error: float  # ‖C − served‖_F / ‖C‖_F over all modules; 0.0 when exact

    @property
    def exact(self) -> bool:
        return self.rank is not None and self.rank <= self.served_rank

    def summary(self) -> dict[str, float | int | bool | None]:
        return {
            "rank": self.rank,
            "served_rank": self.served_rank,
            "exact": self.exact,
            "relative_error": self.relative_error,
        }


Live = LoraAdapter | DenseDelta | None


def correction(target: LoraAdapter | None, live: Live, max_rank: int) -> Correction:
    """The LoRA that turns W0 + ΔW_live into W0 + ΔW_target (``target`` None: the base model).

    Exact when the correction's rank is at most ``max_rank``; otherwise its best rank-``max_rank``
    approximation with the relative error reported. Computed in float64."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    with _one_thread():
        return _correction(target, live, max_rank)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile: these are many small LAPACK calls (k × k cores, QRs of
    thin matrices), which on a busy 2-core machine ran 50–80× slower with two OpenMP threads
    spinning against each other (an 80 × 256 SVD: 0.66 s against 8 ms). Process-wide while it
    lasts; the API process does no other torch work (the engine runs in its own process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _correction(target: LoraAdapter | None, live: Live, max_rank: int) -> Correction:
    names = sorted(set(target.modules if target else ()) | set(_live_names(live)))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (B (d_out, k), A (k, d_in))
    rank: int | None = 0
    kept_sq, total_sq = 0.0, 0.0
    for name in names:
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (B, A) with ΔW = B @ A
        dense: torch.Tensor | None = None
        if target is not None and name in target.modules:
            pairs.append(_pair(target.modules[name], 1.0))
        if isinstance(live, LoraAdapter) and name in live.modules:
            pairs.append(_pair(live.modules[name], -1.0))
        elif isinstance(live, DenseDelta) and name in live.deltas:
            dense = -live.deltas[name].double()
        rest_sq = 0.0  # ‖C‖² outside the directions computed
        if dense is None:
            left, S, right = factored_svd(pairs)
        else:
            total = dense + sum((B @ A for B, A in pairs), torch.zeros_like(dense))
            left, S, right, rest_sq = top_singular(total, max_rank)
        scale = sum(float(B.norm() * A.norm()) for B, A in pairs)
        scale += float(dense.norm()) if dense is not None else 0.0
        threshold = TOLERANCE * scale
        significant = torch.gt(S, threshold)
        k_module = int(significant.sum())  # S is sorted descending
        keep = min(k_module, max_rank)
        unknown = rest_sq > threshold**2  # more directions than computed: rank > keep
        rank = None if rank is None or unknown else max(rank, k_module)
        kept_sq += float((S[:keep] ** 2).sum())
        total_sq += float((S[:k_module] ** 2).sum()) + (rest_sq if unknown else 0.0)
        factors[name] = balanced_factors(left, S, right, keep)
    served_rank = max((B.shape[1] for B, _ in factors.values()), default=0)
    error = math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq > 0 else 0.0
    if served_rank == 0:
        return Correction(None, 0, 0, 0.0)
    modules = {name: padded(B, A, served_rank) for name, (B, A) in factors.items()}
    return Correction(LoraAdapter(modules=modules), rank, served_rank, error)


def reconstruct(adapter: LoraAdapter | None, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """ΔW of a correction per module (zeros where it has none): for tests and diagnostics."""
    out = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    for name, module in (adapter.modules if adapter else {}).items():
        out[name] = module.scale * module.B.double() @ module.A.double()
    return out


def _live_names(live: Live) -> list[str]:
    if isinstance(live, LoraAdapter):
        return list(live.modules)
    if isinstance(live, DenseDelta):
        return list(live.deltas)
    return []


def _pair(module: LoraModule, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    return sign * module.scale * module.B.double(), module.A.double()  # (d_out, r), (r, d_in)
