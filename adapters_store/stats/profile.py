"""What one task's factors say about one module on their own, before any comparison with
earlier tasks (:class:`TaskProfile`).

Its own module because it is the only place that touches ΔW entries of the new task: everything
:class:`~adapters_store.stats.module.ModuleStats` keeps about a task (values on the evaluated
positions, its max, spectrum, sparsity and packed active bits) is computed here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from adapters_store.stats.bits import active_levels, b_grid, pack
from adapters_store.stats.factors import Factors
from adapters_store.stats.measures import delta_at, generalized_sparsity, l1_delta, max_abs_delta, spectrum
from adapters_store.stats.params import StatsParams
from adapters_store.stats.positions import positions_for


@dataclass(frozen=True)
class TaskProfile:
    """What one task's factors say about one module on their own, before any comparison."""

    rank: int
    scale: float
    values: torch.Tensor  # ΔW_t on P, float64 (|P|,)
    active: torch.Tensor  # |ΔW_t| > ε · max_abs on P for each ε level, bool (L, |P|)
    max_abs: float  # max |ΔW_t| over the whole module, exact
    sparsity: float | None  # eq. 9
    singular: torch.Tensor  # singular values of ΔW_t, descending
    r_a: torch.Tensor  # R of the QR of A_tᵀ, (min(d_in, r), r)
    b_max: float  # max |B_t|
    dw_bits: np.ndarray  # packed ``active``, (L, ⌈|P|/8⌉)
    owned_bits: np.ndarray  # packed M_t on the (d_out, width) grid, column-major
    b_bits: np.ndarray  # packed |B_t| > ε · b_max on the same grid for each ε level, (L, bytes)


def profile_task(f: Factors, module: str, width: int, params: StatsParams) -> TaskProfile:
    """Everything about task t in this module that needs only its own factors: O(|P| · r) for
    the entries on P, one pruned row pass for the max, r × r problems for the spectrum."""
    if f.mask is not None and bool(f.B.float().masked_select(~f.mask.bool()).any()):
        raise ValueError(f"{module}: B has non-zero entries outside its mask (B must be stored masked)")
    pos = positions_for(module, f.shape, params)
    values = delta_at(f, pos, params.row_chunk)  # (|P|,)
    magnitudes = values.abs()
    max_abs = float(magnitudes.max()) if pos.exact else max_abs_delta(f, params.row_chunk)
    active = active_levels(magnitudes, max_abs, params.eps_levels)
    singular, r_a = spectrum(f)
    sparsity = generalized_sparsity(values)
    frobenius = float(singular.square().sum().sqrt())
    if sparsity is None and not pos.exact and frobenius > 0:
        # the sample holds only zeros of a non-zero ΔW (extremely sparse): the exact ‖ΔW‖₁
        sparsity = l1_delta(f, params.row_chunk) / (math.sqrt(f.shape[0] * f.shape[1]) * frobenius)
    b_abs = f.B.float().abs()
    b_max = float(b_abs.max())
    return TaskProfile(
        rank=f.rank,
        scale=f.scale,
        values=values,
        active=active,
        max_abs=max_abs,
        sparsity=sparsity,
        singular=singular,
        r_a=r_a,
        b_max=b_max,
        dw_bits=pack(active),
        owned_bits=pack(b_grid(f.owned(), width)),
        b_bits=pack(active_levels(b_grid(b_abs, width), b_max, params.eps_levels)),
    )
