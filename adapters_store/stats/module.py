"""The statistics of one target module over the live tasks, grown one task at a time.

Its own module because this is the incremental part: :class:`ModuleStats` keeps exactly what a
later task is compared against (packed bits, R factors, S = Σ ΔW on the evaluated positions,
pair matrices), so adding a task never forms an earlier task's ΔW again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from adapters_store.stats.bits import grow_pairs, packed_bytes, pad_cols, pair_counts
from adapters_store.stats.factors import Factors
from adapters_store.stats.params import StatsParams
from adapters_store.stats.positions import positions_for
from adapters_store.stats.products import PairProducts, Products
from adapters_store.stats.profile import TaskProfile, profile_task


@dataclass(frozen=True)
class ModuleStats:
    """Everything about one target module over the live tasks (oldest first) that a later task
    is compared against. Immutable: :meth:`append` returns a new one.

    Per-task arrays have one entry per task (absent tasks: zeros, NaN or -1); pair arrays are
    (t, t) and symmetric, their diagonal the task itself (a count of its own active positions,
    ‖A_t A_tᵀ‖_F², ‖ΔW_tᵀΔW_t‖₂ = ‖ΔW_t‖₂²). What depends on ε has one more axis of L entries,
    one per level of ``StatsParams.eps_levels``: dw_bits and b_bits are (t, L, bytes), dw_pairs
    and b_pairs (L, t, t); :meth:`empty` sizes it (the field defaults are for L = 1).
    """

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    positions: int  # |P|: ΔW positions the position-wise measures are evaluated on
    exact: bool  # P is every position
    width: int = 0  # R: the grid of B positions is (d_out, R)
    # per task
    present: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0))
    max_abs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # max |ΔW_t|, exact
    b_max: np.ndarray = field(default_factory=lambda: np.zeros(0))  # max |B_t ⊙ M_t|
    sparsity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: undefined
    singular: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (t, R) descending
    sign_same: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # -1: undefined
    sign_opposite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    r_a: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))  # (t, R, R) R factor of A_tᵀ
    dw_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 0), dtype=np.uint8))  # active ΔW on P
    owned_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.uint8))  # M_t
    b_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 0), dtype=np.uint8))  # active B
    s_values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Σ ΔW_t on P, float64
    # pairs
    dw_pairs: np.ndarray = field(default_factory=lambda: np.zeros((1, 0, 0), dtype=np.int64))
    b_pairs: np.ndarray = field(default_factory=lambda: np.zeros((1, 0, 0), dtype=np.int64))
    overlap_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    oo: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    awom: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @classmethod
    def empty(cls, name: str, shape: tuple[int, int], params: StatsParams) -> ModuleStats:
        pos = positions_for(name, shape, params)
        levels = len(params.eps_levels)
        return cls(
            name=name,
            shape=shape,
            positions=pos.count,
            exact=pos.exact,
            dw_bits=np.zeros((0, levels, packed_bytes(pos.count)), dtype=np.uint8),
            b_bits=np.zeros((0, levels, 0), dtype=np.uint8),  # no columns until a task comes in
            s_values=np.zeros(pos.count),
            dw_pairs=np.zeros((levels, 0, 0), dtype=np.int64),
            b_pairs=np.zeros((levels, 0, 0), dtype=np.int64),
        )

    @property
    def tasks(self) -> int:
        return int(self.present.shape[0])

    @property
    def b_size(self) -> int:
        """|B|: positions of the (d_out, R) grid."""
        return self.shape[0] * self.width

    def append(
        self,
        new: Factors | None,
        earlier: Sequence[Factors | None],
        params: StatsParams,
        grams: Products | None = None,
    ) -> ModuleStats:
        """Add the next task (``None``: it does not adapt this module).

        ``earlier`` are the factors of the tasks already in here, oldest first; only their A and
        B are read, for OO and AWOM, and only when ``new`` is present. ``grams``, when given,
        already holds those products (a full computation makes them in one pass).
        """
        if len(earlier) != self.tasks:
            raise ValueError(f"{self.name}: {len(earlier)} earlier factors for {self.tasks} tasks")
        if new is None:
            return self._append_absent()
        if new.shape != self.shape:
            raise ValueError(f"{self.name}: task has shape {new.shape}, module has {self.shape}")
        stats = self._widen(max(self.width, new.rank))
        return stats._append_present(new, earlier, params, grams)

    # -- internals --

    def _widen(self, width: int) -> ModuleStats:
        """Grow the B grid to ``width`` columns (zero bits / zero padding for earlier tasks)."""
        if width == self.width:
            return self
        b_bytes = packed_bytes(self.shape[0] * width)
        return replace(
            self,
            width=width,
            singular=pad_cols(self.singular, width),
            r_a=pad_cols(np.pad(self.r_a, [(0, 0), (0, width - self.width), (0, 0)]), width),
            owned_bits=pad_cols(self.owned_bits, b_bytes),
            b_bits=pad_cols(self.b_bits, b_bytes),
        )

    def _append_absent(self) -> ModuleStats:
        pairs = {key: np.zeros((*getattr(self, key).shape[:-2], self.tasks + 1)) for key in _PAIR_FIELDS}
        return self._appended(None, (-1, -1), pairs)

    def _append_present(
        self, f: Factors, earlier: Sequence[Factors | None], params: StatsParams, grams: Products | None
    ) -> ModuleStats:
        p = profile_task(f, self.name, self.width, params)
        oo, awom = self._orthogonality(f, p, earlier, grams)
        pairs = {pair: pair_counts(getattr(self, bits), getattr(p, bits)) for bits, pair in _COUNTED.items()}
        return self._appended(
            p, self._signs(p.values, p.active[params.primary]), {**pairs, "oo": oo, "awom": awom}
        )

    def _signs(self, values: torch.Tensor, active: torch.Tensor) -> tuple[int, int]:
        """PS-LoRA Table 6 counts on P: active entries of ΔW_t whose sign equals / opposes
        sign(S), S = Σ_{i<t} ΔW_i ≠ 0. (-1, -1) when no earlier task adapts the module."""
        if not self.present.any():
            return -1, -1
        s = torch.from_numpy(self.s_values)
        agreement = torch.sign(values) * torch.sign(s)  # +1 same, -1 opposite, 0 where S = 0
        return int((active & (agreement > 0)).sum()), int((active & (agreement < 0)).sum())

    def _orthogonality(
        self, f: Factors, p: TaskProfile, earlier: Sequence[Factors | None], grams: Products | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """OO (eq. 7) and AWOM (eq. 8) of the new task against every earlier one and itself.

        OO_it = ‖A_i A_tᵀ‖_F² from an (r_i, r_t) product. For AWOM, ΔW_iᵀΔW_t =
        s_i s_t A_iᵀ (B_iᵀ B_t) A_t = s_i s_t Q_i (R_i B_iᵀ B_t R_tᵀ) Q_tᵀ with A_iᵀ = Q_i R_i, so
        its spectral norm is that of the small middle matrix (R_i stored when task i came in).
        Reading A_i and B_i (:class:`Products`) is the whole cost; the small matrices are batched
        over tasks.
        """
        t, width = self.tasks, self.width
        if grams is None:  # an update: the new task against the earlier ones only
            grams = PairProducts(earlier, {t: f})
        a_products = torch.zeros(t, width, f.rank)  # A_i A_tᵀ, padded to R rows
        b_products = torch.zeros(t, width, f.rank)  # B_iᵀ B_t
        scales = torch.zeros(t, dtype=torch.float64)
        for i, g in enumerate(earlier):
            if g is not None:
                a_products[i, : g.rank], b_products[i, : g.rank] = grams.pair(i, t)
                scales[i] = abs(g.scale * f.scale)
        oo = a_products.double().square().sum(dim=(1, 2))  # (t,)
        middle = (
            torch.from_numpy(self.r_a) @ b_products.double() @ p.r_a.T
        )  # (t, R, R)·(t, R, r_t)·(r_t, k_t)
        awom = scales * torch.linalg.matrix_norm(middle, ord=2) if t else torch.zeros(0, dtype=torch.float64)
        own_oo = float((f.A.float() @ f.A.float().T).double().square().sum())
        own_awom = float(p.singular.max()) ** 2 if p.singular.numel() else 0.0  # ‖ΔWᵀΔW‖₂ = σ_max²
        return np.append(oo.numpy(), own_oo), np.append(awom.numpy(), own_awom)

    def _appended(
        self, p: TaskProfile | None, sign: tuple[int, int], pairs: dict[str, np.ndarray]
    ) -> ModuleStats:
        """This plus one task: its profile (None: absent), sign counts and pair rows (keyed by
        the pair field)."""
        width = self.width
        r_a = np.zeros((width, width))
        singular = np.zeros(width)
        if p is not None:
            r_a[: p.r_a.shape[0], : p.r_a.shape[1]] = p.r_a.numpy()
            singular[: p.singular.numel()] = p.singular.numpy()
        bits_and_pairs: dict[str, Any] = {
            **{
                key: np.concatenate([getattr(self, key), _row(p, key, getattr(self, key))])
                for key in _COUNTED
            },
            **{key: grow_pairs(getattr(self, key), pairs[key]) for key in _PAIR_FIELDS},
        }
        return replace(
            self,
            present=np.append(self.present, p is not None),
            ranks=np.append(self.ranks, 0 if p is None else p.rank),
            scales=np.append(self.scales, 0.0 if p is None else p.scale),
            max_abs=np.append(self.max_abs, 0.0 if p is None else p.max_abs),
            b_max=np.append(self.b_max, 0.0 if p is None else p.b_max),
            sparsity=np.append(self.sparsity, math.nan if p is None or p.sparsity is None else p.sparsity),
            singular=np.concatenate([self.singular, singular[None, :]]),
            sign_same=np.append(self.sign_same, sign[0]),
            sign_opposite=np.append(self.sign_opposite, sign[1]),
            r_a=np.concatenate([self.r_a, r_a[None]]),
            s_values=self.s_values if p is None else self.s_values + p.values.numpy(),
            **bits_and_pairs,
        )


_COUNTED = {"dw_bits": "dw_pairs", "owned_bits": "overlap_pairs", "b_bits": "b_pairs"}
"""The packed bit sets a task keeps (fields of both :class:`ModuleStats` and :class:`TaskProfile`)
and the pair counts their intersections fill."""
_PAIR_FIELDS = ("dw_pairs", "b_pairs", "overlap_pairs", "oo", "awom")


def _row(p: TaskProfile | None, key: str, rows: np.ndarray) -> np.ndarray:
    """The task's packed bits ``key`` as one new row of ``rows`` (zeros for an absent task)."""
    return np.zeros((1, *rows.shape[1:]), dtype=np.uint8) if p is None else getattr(p, key)[None]
