"""The JSON view of the statistics (schema 2): per module and aggregated over modules.

Its own module because the view is what people and the admin API read, with its own rules
(6 significant digits, null where undefined, sampled counts scaled to their module's size),
while the kept state (:class:`~adapters_store.stats.module.ModuleStats`) stays in counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from adapters_store.stats.bits import popcount
from adapters_store.stats.module import ModuleStats
from adapters_store.stats.params import STATS_SCHEMA, StatsParams, eps_key


class StoreStatsFields(Protocol):
    """What the view reads of :class:`~adapters_store.stats.compute.StoreStats`. Spelled out here
    because ``StoreStats.to_dict`` is this view, so ``compute`` imports this module and this
    module cannot import ``compute`` back."""

    @property
    def params(self) -> StatsParams: ...
    @property
    def tasks(self) -> Sequence[str]: ...  # task version ids, oldest first
    @property
    def modules(self) -> Mapping[str, ModuleStats]: ...


def _num(x: float) -> float | None:
    """6 significant digits (the view is for people; keeps the JSON small); None for NaN/inf."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[_num(float(x)) for x in row] for row in m]


def _mean_pairs(m: np.ndarray) -> float | None:
    """N-LoRA eq. 10: the mean over pairs i < j (None with fewer than two tasks)."""
    t = m.shape[0]
    return _num(float(m[np.triu_indices(t, k=1)].mean())) if t >= 2 else None


def _earlier_sums(m: np.ndarray, present: np.ndarray) -> list[float | None]:
    """Per task t, Σ_{i<t} m[i, t] (eqs. 7 and 8); None where the task is absent."""
    return [_num(float(m[:t, t].sum())) if present[t] else None for t in range(m.shape[0])]


def _per_task(values: np.ndarray, present: np.ndarray) -> list[float | None]:
    return [_num(float(v)) if p else None for v, p in zip(values, present, strict=True)]


def _collisions(
    params: StatsParams, cr_dw: np.ndarray, cr_b: np.ndarray, *, matrices: bool
) -> dict[str, Any]:
    """CR (eq. 11; matrices only if asked) and ACR (eq. 10) in ΔW and in B space from (L, t, t)
    shares: every level under ``<key>_by_eps`` ({:func:`eps_key`: value}), and the primary ε's
    under the plain key, which readers of schema 1 know (taken from the same dict, so the two
    always agree)."""
    out: dict[str, Any] = {}
    views = {"acr": _mean_pairs, **({"cr": _matrix} if matrices else {})}
    for space, cr in (("dw", cr_dw), ("b", cr_b)):
        for kind, view in views.items():
            by_eps = {eps_key(eps): view(m) for eps, m in zip(params.eps_levels, cr, strict=True)}
            out[f"{kind}_{space}"] = by_eps[eps_key(params.eps)]
            out[f"{kind}_{space}_by_eps"] = by_eps
    return out


def _module_view(s: ModuleStats, params: StatsParams, module_matrices: bool) -> dict[str, Any]:
    d_out, d_in = s.shape
    union = popcount(np.bitwise_or.reduce(s.owned_bits, axis=0)) if s.tasks else 0
    cr_dw = s.dw_pairs / s.positions  # (L, t, t)
    cr_b = s.b_pairs / s.b_size
    overlap = s.overlap_pairs / s.b_size
    nuclear = s.singular.sum(axis=1)
    spectral = s.singular.max(axis=1, initial=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        effective_rank = np.where(spectral > 0, nuclear / spectral, np.nan)
        sign_defined = s.sign_same >= 0
        same = np.where(sign_defined, s.sign_same / s.positions, np.nan)
        opposite = np.where(sign_defined, s.sign_opposite / s.positions, np.nan)
    view: dict[str, Any] = {
        "shape": [d_out, d_in],
        "rank": s.width,
        "b_positions": s.b_size,
        "exact": s.exact,
        "sample_size": s.positions,
        "cr_standard_error_max": 0.0 if s.exact else _num(0.5 / math.sqrt(s.positions)),
        "occupancy": _num(union / s.b_size),
        "b_positions_free": s.b_size - union,
        "task_share": _per_task(np.diag(overlap), s.present),
        "mask_overlap_mean": _mean_pairs(overlap),
        "density_dw": _per_task(np.diag(cr_dw[params.primary]), s.present),
        **_collisions(params, cr_dw, cr_b, matrices=module_matrices),
        "oo_per_task": _earlier_sums(s.oo, s.present),
        "awom_per_task": _earlier_sums(s.awom, s.present),
        "sparsity": _per_task(s.sparsity, s.present),
        "nuclear_norm": _per_task(nuclear, s.present),
        "effective_rank": _per_task(effective_rank, s.present),
        "sign_same": _per_task(same, s.present),
        "sign_opposite": _per_task(opposite, s.present),
        "max_abs": _per_task(s.max_abs, s.present),
    }
    if module_matrices:
        view.update(
            mask_overlap=_matrix(overlap),
            oo=_matrix(s.oo),
            awom=_matrix(s.awom),
        )
    return view


def _aggregate(stats: StoreStatsFields, views: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over all modules: shares are those of all positions together (each module weighs by its
    size; a sampled module's counts are scaled up to its size), OO and AWOM are summed over
    modules (as O-LoRA sums its loss over layers), per-task norms and sparsity are averaged over
    the modules a task adapts."""
    t, levels = len(stats.tasks), len(stats.params.eps_levels)
    mods = list(stats.modules.values())
    dw_total = sum(s.shape[0] * s.shape[1] for s in mods)
    b_total = sum(s.b_size for s in mods)
    zeros = np.zeros((levels, t, t))
    cr_dw = sum((s.dw_pairs * (s.shape[0] * s.shape[1] / s.positions) for s in mods), zeros) / max(
        dw_total, 1
    )
    cr_b = sum((s.b_pairs for s in mods), zeros) / max(b_total, 1)
    overlap = sum((s.overlap_pairs for s in mods), np.zeros((t, t))) / max(b_total, 1)
    union = sum(popcount(np.bitwise_or.reduce(s.owned_bits, axis=0)) for s in mods if s.tasks)
    oo = sum((s.oo for s in mods), np.zeros((t, t)))
    awom = sum((s.awom for s in mods), np.zeros((t, t)))
    present = np.array([any(s.present[i] for s in mods) for i in range(t)], dtype=bool)
    # standard error of a share estimated from the sampled modules (exact ones add none)
    variance = sum((s.shape[0] * s.shape[1]) ** 2 / s.positions for s in mods if not s.exact)
    return {
        "positions": dw_total,
        "b_positions": b_total,
        "occupancy": _num(union / max(b_total, 1)),
        "b_positions_free": b_total - union,
        "task_share": _per_task(np.diag(overlap), present),
        "mask_overlap": _matrix(overlap),
        "mask_overlap_mean": _mean_pairs(overlap),
        **_collisions(stats.params, cr_dw, cr_b, matrices=True),
        "cr_standard_error_max": _num(0.5 * math.sqrt(variance) / max(dw_total, 1)),
        "oo": _matrix(oo),
        "oo_per_task": _earlier_sums(oo, present),
        "awom": _matrix(awom),
        "awom_per_task": _earlier_sums(awom, present),
        "sparsity": _module_mean(views, t, "sparsity"),
        "nuclear_norm": _module_mean(views, t, "nuclear_norm"),
        "effective_rank": _module_mean(views, t, "effective_rank"),
        "sign_same": _sign_share(stats, same=True),
        "sign_opposite": _sign_share(stats, same=False),
    }


def _module_mean(views: dict[str, dict[str, Any]], tasks: int, key: str) -> list[float | None]:
    """Per task, the mean of a per-module value over the modules the task adapts."""
    out: list[float | None] = []
    for i in range(tasks):
        values = [view[key][i] for view in views.values() if view[key][i] is not None]
        out.append(_num(sum(values) / len(values)) if values else None)
    return out


def _sign_share(stats: StoreStatsFields, *, same: bool) -> list[float | None]:
    """Share of all positions (of the modules where it is defined), sampled modules scaled up."""
    out: list[float | None] = []
    for i in range(len(stats.tasks)):
        hits = total = 0.0
        for s in stats.modules.values():
            count = (s.sign_same if same else s.sign_opposite)[i]
            if count >= 0:
                size = s.shape[0] * s.shape[1]
                hits += count * size / s.positions
                total += size
        out.append(_num(hits / total) if total else None)
    return out


def summary(stats: StoreStatsFields, *, module_matrices: bool = False) -> dict[str, Any]:
    """The JSON view (schema 2). Every per-task list and every matrix row/column follows
    ``tasks`` (oldest first); per-task entries are null where a task does not adapt a module
    or a measure is undefined (sign shares of the first task, sparsity of a zero update).
    Keys ending in ``_by_eps`` map each ε of ``params.eps_levels`` (as :func:`eps_key` writes
    it: "0.001", "0.01", "0.1") to the value at that ε; the same key without the suffix is the
    value at the primary ``params.eps`` (what schema 1 had).

    ``{"schema", "params", "tasks", "aggregate": {...}, "modules": {name: {...}}}``, where

    - aggregate: positions, b_positions, occupancy, b_positions_free, task_share,
      mask_overlap (matrix) + mask_overlap_mean, cr_dw (matrix) + acr_dw + cr_standard_error_max,
      cr_b (matrix) + acr_b, cr_dw_by_eps + acr_dw_by_eps, cr_b_by_eps + acr_b_by_eps, oo (matrix)
      + oo_per_task (eq. 7), awom (matrix) + awom_per_task (eq. 8), sparsity, nuclear_norm,
      effective_rank, sign_same, sign_opposite (per task);
    - modules[name]: shape, rank, b_positions, exact, sample_size, cr_standard_error_max,
      occupancy, b_positions_free, task_share, mask_overlap_mean, density_dw (each task's own
      active share at the primary ε, CR's diagonal), acr_dw, acr_b, acr_dw_by_eps, acr_b_by_eps,
      oo_per_task, awom_per_task, sparsity, nuclear_norm, effective_rank, sign_same, sign_opposite
      (at the primary ε), max_abs (the ε threshold's max); with ``module_matrices`` also cr_dw,
      cr_b, cr_dw_by_eps, cr_b_by_eps, mask_overlap, oo, awom.
    """
    views = {
        name: _module_view(s, stats.params, module_matrices) for name, s in sorted(stats.modules.items())
    }
    return {
        "schema": STATS_SCHEMA,
        "params": stats.params.as_dict(),
        "tasks": list(stats.tasks),
        "aggregate": _aggregate(stats, views),
        "modules": views,
    }
