"""A_i A_jᵀ and B_iᵀ B_j of pairs of one module's tasks: everything OO and AWOM read of the
factors.

Its own module because there are two ways to get them with different costs: a full computation
stacks every factor and runs two GEMMs (:class:`ModuleGrams`), an update reads each earlier
factor once without copying it (:class:`PairProducts`); :class:`~adapters_store.stats.module.ModuleStats`
takes either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from adapters_store.stats.factors import Factors


class Products(Protocol):
    """A_i A_jᵀ and B_iᵀ B_j of a pair of one module's tasks, each (r_i, r_j): what OO and AWOM
    read of the factors."""

    def pair(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ModuleGrams:
    """A_i A_jᵀ and B_iᵀ B_j (each r_i × r_j) for tasks i in ``rows`` and j in ``cols`` (default:
    the same tasks) of one module, from two GEMMs over the stacked factors.

    A full computation uses it: every factor is read once (and copied once) instead of once per
    later task, and two large GEMMs run far faster than T²/2 small ones. The sums run in another
    order than pair by pair: the numbers agree to fp32 rounding.
    """

    def __init__(self, rows: Sequence[Factors | None], cols: dict[int, Factors] | None = None) -> None:
        row_factors = {i: f for i, f in enumerate(rows) if f is not None}
        col_factors = row_factors if cols is None else cols
        self.rows, self.cols = _slices(row_factors), _slices(col_factors)
        if not row_factors or not col_factors:
            self.a = self.b = torch.zeros(0, 0)
            return
        A_rows, Bt_rows = _stack(row_factors)  # (Σr_i, d_in), (Σr_i, d_out)
        A_cols, Bt_cols = (A_rows, Bt_rows) if cols is None else _stack(col_factors)
        self.a = (A_cols @ A_rows.T).T  # (Σr_i, Σr_j); this operand order was the faster GEMM here
        self.b = (Bt_cols @ Bt_rows.T).T

    def pair(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i A_jᵀ, B_iᵀ B_j), each (r_i, r_j)."""
        return self.a[self.rows[i], self.cols[j]], self.b[self.rows[i], self.cols[j]]


class PairProducts:
    """The same products as :class:`ModuleGrams`, one small GEMM per pair, without copying the
    factors. An update uses it: it reads each earlier factor once either way (that memory traffic
    is its main cost), and this way needs no stacked copy of them."""

    def __init__(self, rows: Sequence[Factors | None], cols: dict[int, Factors]) -> None:
        self.rows, self.cols = rows, cols
        self._cols_t = {j: (f.A.float().T.contiguous(), f.B.float()) for j, f in cols.items()}

    def pair(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.rows[i]
        assert g is not None
        A_jt, B_j = self._cols_t[j]  # (d_in, r_j), (d_out, r_j)
        return g.A.float() @ A_jt, g.B.float().T @ B_j


def _slices(factors: dict[int, Factors]) -> dict[int, slice]:
    """Each task's rows in the stacked factors."""
    out, offset = {}, 0
    for i, f in factors.items():
        out[i] = slice(offset, offset + f.rank)
        offset += f.rank
    return out


def _stack(factors: dict[int, Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """All A stacked (Σr, d_in) and all Bᵀ stacked (Σr, d_out), fp32."""
    A = torch.cat([f.A.float() for f in factors.values()])
    Bt = torch.cat([f.B.float().T for f in factors.values()])
    return A, Bt
