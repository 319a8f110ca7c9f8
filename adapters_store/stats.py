"""Statistics of the live task adapters: how much they share, collide and overlap (the admin view).

DESIGN.md "Stats" is the spec. Notation (PEFT's, as everywhere in Lamina): task t adds
ΔW_t = s_t · (B_t ⊙ M_t) @ A_t to a target module of shape (d_out, d_in), with A_t (r_t, d_in),
B_t (d_out, r_t), mask M_t (d_out, r_t; all ones when the task has none) and s_t = α / r_t.
B_t is stored masked (:class:`~adapters_store.lora.LoraModule`), so B_t ⊙ M_t = B_t.
Every measure is computed per target module and aggregated over modules:

=====================  ========================================================================
occupancy              |∪_t M_t| / |B|: the share of B positions some task owns; per-task share
                       |M_t| / |B|; positions left = |B| − |∪_t M_t| (LoRAF's capacity).
                       |B| = d_out · R, R the widest rank of the module's tasks.
mask overlap           |M_i ∧ M_j| / |B| (LoRI expects ≈ (1 − s)²; LoRAF is exactly 0).
CR_ij, ACR (ΔW)        N-LoRA eq. 11 and eq. 10: the share of positions where both ΔW_i and ΔW_j
                       are *active*, and its mean over pairs i < j. Active means
                       |ΔW_t[a, b]| > ε · max |ΔW_t|, the max taken over the whole module
                       matrix of that one task (eq. 11 says "≠ 0"; a product B·A is never exactly
                       0, hence ε; ε = 0 gives eq. 11 literally).
CR_ij, ACR (B)         the same on B positions: active means |B_t[a, k]| > ε · max |B_t|.
CR, ACR at several ε   both at every ε of ``eps_levels`` (default 10⁻³, 10⁻², 10⁻¹), because one ε
                       misleads: between ε = 10⁻³ and 10⁻¹ the ratio of O-LoRA's ACR to N-LoRA's
                       moves from 1.9× to 312× (issue 11). The single-ε fields use the primary
                       ``eps``. Active sets are nested (a larger ε activates a subset of the
                       positions), so every CR and ACR is non-increasing in ε.
OO                     N-LoRA eq. 7 (from O-LoRA): OO_ij = ‖A_i A_jᵀ‖_F², per task
                       O_t = Σ_{i<t} OO_it. (The paper's Aᵀ is PEFT's A: r × d_in.)
AWOM                   N-LoRA eq. 8: AWOM_ij = ‖ΔW_iᵀ ΔW_j‖₂ (spectral norm), per task
                       Σ_{i<t} AWOM_it. Computed from r × r matrices, never from ΔW.
sparsity               N-LoRA eq. 9 with q = 1, p = 2: ‖ΔW‖₁ / (√(mn) · ‖ΔW‖_F) ∈ (0, 1];
                       1 for a constant matrix, 1/√(mn) for a single non-zero entry. (Eq. 17
                       multiplies by √(mn) instead of dividing; that form is unbounded.)
sign conflicts         PS-LoRA Table 6: the shares of positions where ΔW_t is active and its sign
                       equals ("same") or opposes ("opposite") that of S = Σ_{i<t} ΔW_i (S ≠ 0).
                       Like the table, both are shares of all positions, so they need not add
                       to 1. Undefined (null) when no earlier task adapts the module.
nuclear norm, rank     ‖ΔW_t‖_* (N-LoRA §3.3 reads it as the number of subspaces a task uses) and
                       the scale-free effective rank ‖ΔW_t‖_* / ‖ΔW_t‖₂ ∈ [1, r_t], both from the
                       singular values of an r × r matrix (QR of B and of Aᵀ).
=====================  ========================================================================

Neither collisions nor orthogonality implies the other: N-LoRA's Theorem 1 (non-collision ⇒
ΔW₁ᵀΔW₂ = 0) fails for the off-diagonal entries, so both are reported.

**Exact or sampled.** Measures on ΔW positions (CR, sign shares, sparsity) need ΔW entries.
A module with at most ``exact_up_to`` positions is evaluated on all of them, exactly. A larger
one (4096 × 4096 in a 7B model) is evaluated on ``sample_size`` positions drawn uniformly with
replacement from a generator seeded by (``seed``, module name), the same positions for every
task, so that the per-position state below lines up across tasks. A share p estimated this way
has standard error √(p(1 − p)/n) ≤ 0.5/√n (0.0039 for the default n = 16 384; over the 64 q/v
modules of a 7B model, 0.0005 for the aggregate); the JSON reports these bounds. Sparsity on a
sample is the ratio mean|x| / √mean(x²) of the sampled entries: still in (0, 1] and exactly 1 for
a constant matrix, but it can be far off for a ΔW with fewer non-zero entries than 1/n of its
positions (a sample with none at all falls back to an exact pass).
The threshold max |ΔW_t| is always exact: only the rows of ΔW_t whose Cauchy–Schwarz bound
|s|·‖B[a, :]‖·max_b ‖A[:, b]‖ exceeds the max of the most promising rows are formed (a few
percent in practice; all of them at worst, see :func:`max_abs_delta`). OO, AWOM, nuclear norm and
occupancy/overlap/CR in B space are always exact.

**Incremental.** Tasks only ever get appended, and every measure of a pair (i, t) or of a task t
depends only on tasks ≤ t. So :class:`ModuleStats` keeps, per task, what a later task is
compared against: packed bits of its active ΔW positions (|P| bits per ε level), of its mask
(d_out · R bits) and of its active B positions (d_out · R bits per ε level), the R factor of its
A (r × r), a few scalars, and S = Σ ΔW_i at the positions. Adding task t then costs
O(L · (|P| + d_out·R)) per earlier task in bit operations (L: the number of ε levels), plus
reading A_i and B_i once for OO and AWOM — O(t · (d_in + d_out) · r²) flops per module — and one
O(d_out · d_in · r) pass over ΔW_t's rows at worst for its max. All levels come from the same
entries of ΔW_t on P and of B_t, compared with each threshold in turn. No ΔW of an earlier task is
ever formed again, and no full ΔW of a large module is held at once: rows are formed
``row_chunk`` at a time. A full computation (:func:`compute_stats`) appends the tasks one by one
the same way, except that it takes the A_i A_jᵀ and B_iᵀ B_j products of all pairs from two GEMMs
per module (:class:`ModuleGrams`) instead of one pass over earlier factors per task.

**Memory of the levels.** The kept bits grow with L: per task and module
L · (|P| + d_out · R) + d_out · R bits. For a 7B model (|P| = 16 384, d_out · R = 4096 · 8) that
is 2 KiB + 4 KiB per level plus 4 KiB for the mask: 22 KiB at the default L = 3 against 10 KiB at
L = 1, i.e. 138 MiB against 63 MiB for 100 tasks on 64 modules. The pair matrices (CR counts per
level, mask overlap, OO, AWOM) are 2L + 3 (t × t) arrays of 8-byte numbers per module: 44 MiB at
L = 3 for 100 tasks on 64 modules, against 24 MiB at L = 1.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

from adapters_store.lora import LoraAdapter

STATS_SCHEMA = 2  # 2: CR/ACR at several ε (``eps_levels``, the ``*_by_eps`` keys)


@dataclass(frozen=True)
class StatsParams:
    """How the statistics are computed. Part of the cache key: other params, other numbers."""

    eps: float = 1e-3
    """The primary threshold: an entry is *active* when |x| > eps · (max |x| of the same task and
    module). The single-ε fields (cr_dw, acr_dw, cr_b, acr_b, density_dw, sign shares) use it."""
    eps_levels: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    """Every ε that CR and ACR are reported at (the ``*_by_eps`` fields), ascending, no repeats;
    ``eps`` is added when missing, so the primary is always one of them. Each level costs |P| +
    d_out · R bits per task and module (see the module docstring)."""
    exact_up_to: int = 1 << 16
    """Modules with at most this many positions (256 × 256) are evaluated on all of them."""
    sample_size: int = 1 << 14
    """Positions sampled in each larger module (standard error of a share ≤ 0.5/√sample_size)."""
    seed: int = 0
    """Seeds the sampled positions (together with the module name)."""
    row_chunk: int = 256
    """Rows of ΔW formed at once in the exact passes (bounds memory to row_chunk · d_in floats)."""

    def __post_init__(self) -> None:
        levels = tuple(float(e) for e in self.eps_levels)  # a JSON list (a cache header) as well
        for eps in (self.eps, *levels):
            if not (0.0 <= eps < 1.0 and math.isfinite(eps)):
                raise ValueError(f"eps and every eps level must be in [0, 1), got {eps}")
        if list(levels) != sorted(set(levels)):
            raise ValueError(f"eps_levels must be ascending without repeats, got {levels}")
        if self.eps not in levels:
            levels = tuple(sorted((*levels, float(self.eps))))
        object.__setattr__(self, "eps_levels", levels)  # frozen: normalized once, here
        if self.sample_size < 1 or self.exact_up_to < 0:
            raise ValueError(
                f"need sample_size >= 1 and exact_up_to >= 0, got {self.sample_size}, {self.exact_up_to}"
            )
        if self.row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {self.row_chunk}")

    @property
    def primary(self) -> int:
        """The index of ``eps`` in ``eps_levels``."""
        return self.eps_levels.index(self.eps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), so that it compares equal to a cached file's copy."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def eps_key(eps: float) -> str:
    """The key of a level in the ``*_by_eps`` JSON objects: the shortest round-tripping decimal
    (1e-3 → "0.001"), so distinct levels never share a key and ``float(key)`` gives ε back."""
    return repr(float(eps))


# --- where the factors come from ---------------------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """One task's factors in one module: ΔW = scale · B @ A.

    As in :class:`~adapters_store.lora.LoraModule`, B is stored already masked (zero outside
    ``mask``); :meth:`ModuleStats.append` checks that once per task and refuses a B that is not,
    since its ΔW would then differ from the one the merges build.
    """

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r), zero outside mask
    scale: float
    mask: torch.Tensor | None = None  # bool (d_out, r); None: the task owns its whole B

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def owned(self) -> torch.Tensor:
        """M as bool (d_out, r): the B positions this task owns."""
        return torch.ones_like(self.B, dtype=torch.bool) if self.mask is None else self.mask.bool()


class FactorSource(Protocol):
    """The live tasks, oldest first, read one (task, module) at a time so that a caller can
    stream over modules instead of loading every adapter (see ``stats_cache``)."""

    def __len__(self) -> int: ...
    def module_names(self) -> list[str]: ...
    def factors(self, task: int, module: str) -> Factors | None: ...


class AdapterList:
    """A :class:`FactorSource` over adapters already in memory."""

    def __init__(self, adapters: Sequence[LoraAdapter]) -> None:
        self.adapters = list(adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def module_names(self) -> list[str]:
        return sorted({name for adapter in self.adapters for name in adapter.modules})

    def factors(self, task: int, module: str) -> Factors | None:
        adapter = self.adapters[task]
        m = adapter.modules.get(module)
        if m is None:
            return None
        mask = adapter.masks.get(module)
        if mask is not None and tuple(mask.shape) != tuple(m.B.shape):
            raise ValueError(f"mask of {module} has shape {tuple(mask.shape)}, B has {tuple(m.B.shape)}")
        return Factors(A=m.A, B=m.B, scale=float(m.scale), mask=mask)


def as_source(tasks: Sequence[LoraAdapter] | FactorSource) -> FactorSource:
    """Adapters in memory or a lazy source, as a source."""
    if hasattr(tasks, "factors"):
        return tasks  # type: ignore[return-value]
    return AdapterList(tasks)  # type: ignore[arg-type]


# --- positions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Positions:
    """The ΔW positions a module's position-wise measures are evaluated on."""

    shape: tuple[int, int]
    rows: torch.Tensor | None  # (n,) int64; None: all d_out · d_in positions, row-major (exact)
    cols: torch.Tensor | None

    @property
    def exact(self) -> bool:
        return self.rows is None

    @property
    def count(self) -> int:
        return self.shape[0] * self.shape[1] if self.rows is None else int(self.rows.numel())


def positions_for(module: str, shape: tuple[int, int], params: StatsParams) -> Positions:
    """All positions when there are at most ``exact_up_to`` of them, else a seeded uniform sample
    (with replacement, so each sampled share is a mean of i.i.d. indicators). The seed mixes in
    the module name: modules get independent samples. Cached: every task of a module needs them."""
    return _positions(module, shape, params.exact_up_to, params.sample_size, params.seed)


@functools.lru_cache(maxsize=1024)
def _positions(
    module: str, shape: tuple[int, int], exact_up_to: int, sample_size: int, seed: int
) -> Positions:
    d_out, d_in = shape
    if d_out * d_in <= exact_up_to:
        return Positions(shape, None, None)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    flat = torch.randint(d_out * d_in, (sample_size,), generator=g)
    return Positions(shape, flat // d_in, flat % d_in)


def delta_at(f: Factors, pos: Positions, row_chunk: int) -> torch.Tensor:
    """ΔW_t at the positions, float64 (n,). Sampled: n dot products of length r, no ΔW formed."""
    B = f.B.float()
    if pos.rows is None:
        A = f.A.float()
        chunks = [(B[s : s + row_chunk] @ A).flatten() for s in range(0, B.shape[0], row_chunk)]
        return f.scale * torch.cat(chunks).double()
    A_t = f.A.float().T.contiguous()  # (d_in, r): gathering rows of it is contiguous
    return f.scale * (B[pos.rows] * A_t[pos.cols]).sum(dim=1).double()  # (n, r) · (n, r) → (n,)


_FIRST_ROWS = 32  # rows evaluated first, to get a max to prune the others with
_BOUND_MARGIN = 1e-4  # the fp32 bounds are inflated by this much, so rounding never prunes a row


def max_abs_delta(f: Factors, row_chunk: int) -> float:
    """max |ΔW_t| over the whole module matrix, exactly, without forming ΔW_t at once.

    By Cauchy–Schwarz |ΔW[a, b]| ≤ |s| · ‖B[a, :]‖ · max_b ‖A[:, b]‖ =: bound[a]. The rows with
    the largest bounds are evaluated first; their max m rules out every row with bound < m, and
    only the remaining candidates are formed, ``row_chunk`` rows at a time. For trained and for
    random factors that is a few percent of the rows; at worst it is all of them.
    """
    B, A = f.B.float(), f.A.float()
    column_max = float(A.square().sum(dim=0).max().sqrt())  # max_b ‖A[:, b]‖
    bounds = abs(f.scale) * column_max * (1 + _BOUND_MARGIN) * B.norm(dim=1)  # (d_out,)
    first = bounds.topk(min(_FIRST_ROWS, B.shape[0])).indices
    best = abs(f.scale) * _max_abs(B[first] @ A)  # (first, d_in)
    candidates = (bounds > best).nonzero().flatten()
    for start in range(0, candidates.numel(), row_chunk):
        rows = candidates[start : start + row_chunk]
        best = max(best, abs(f.scale) * _max_abs(B[rows] @ A))  # (chunk, d_in)
    return best


def _max_abs(x: torch.Tensor) -> float:
    low, high = torch.aminmax(x)  # one pass, no |x| copy
    return max(-float(low), float(high))


def l1_delta(f: Factors, row_chunk: int) -> float:
    """‖ΔW_t‖₁ streamed over row chunks (used only when a sample misses every non-zero entry)."""
    B, A = f.B.float(), f.A.float()
    return sum(
        abs(f.scale) * float((B[s : s + row_chunk] @ A).abs().sum(dtype=torch.float64))
        for s in range(0, B.shape[0], row_chunk)
    )


def spectrum(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ΔW_t and the R factor of A_tᵀ, both from small matrices.

    With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ, and Q_B, Q_A have
    orthonormal columns, so ΔW's singular values are |s| · svd(R_B R_Aᵀ) (an r × r problem).
    Returns (singular values descending, R_A of shape (min(d_in, r), r)), float64.
    """
    _, R_A = torch.linalg.qr(f.A.double().T)  # Aᵀ (d_in, r) = Q_A R_A
    _, R_B = torch.linalg.qr(f.B.double())  # B (d_out, r) = Q_B R_B
    return abs(f.scale) * torch.linalg.svdvals(R_B @ R_A.T), R_A


def generalized_sparsity(values: torch.Tensor) -> float | None:
    """N-LoRA eq. 9 (q = 1, p = 2) on the given entries: mean|x| / √mean(x²) = ‖x‖₁ / (√n ‖x‖₂).

    In (0, 1] by Cauchy–Schwarz, 1 exactly when all |x| are equal; None for all zeros.
    """
    l2 = float(values.square().sum().sqrt())
    if l2 == 0.0:
        return None
    return float(values.abs().sum()) / (math.sqrt(values.numel()) * l2)


# --- bits ----------------------------------------------------------------------------------------


def _packed_bytes(bits: int) -> int:
    """Bytes that hold ``bits`` packed bits, rounded up to whole 64-bit words: :func:`_pair_counts`
    counts them as uint64, 2.5–4× faster than byte by byte (the zero padding never counts)."""
    return -(-bits // 64) * 8


def _pack(bits: torch.Tensor) -> np.ndarray:
    """Bools packed along the last axis (8 positions a byte, then zero bytes up to whole words):
    (..., n) → (..., :func:`_packed_bytes` (n))."""
    return _pad_cols(np.packbits(bits.numpy(), axis=-1), _packed_bytes(bits.shape[-1]))


def _active(magnitudes: torch.Tensor, peak: float, levels: Sequence[float]) -> torch.Tensor:
    """|x| > ε · peak for every ε of ``levels``: (n,) → (L, n) bool, one row per level.

    The comparison runs in float64 (as the reference does). With ascending levels every row is a
    subset of the one before, which makes CR non-increasing in ε. A zero peak activates nothing.
    """
    if peak <= 0:
        return torch.zeros(len(levels), magnitudes.numel(), dtype=torch.bool)
    thresholds = torch.tensor(levels, dtype=torch.float64).unsqueeze(1) * peak  # (L, 1)
    return magnitudes.flatten().double().unsqueeze(0) > thresholds


def _pair_counts(rows: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The new task's row of a pair-count matrix: |row_i ∧ new| for every earlier task i, then
    |new| (the diagonal), from packed bits. rows (t, ..., nbytes), new (..., nbytes) → (..., t + 1)
    int64; the middle axes (ε levels) pass through."""
    rows, new = rows.view(np.uint64), new.view(np.uint64)  # rows are whole words (_packed_bytes)
    earlier = np.bitwise_count(rows & new).sum(axis=-1, dtype=np.int64)  # (t, ...)
    own = np.bitwise_count(new).sum(axis=-1, dtype=np.int64)  # (...)
    return np.moveaxis(np.concatenate([earlier, np.asarray(own)[None]]), 0, -1)


def _popcount(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


def _b_positions(x: torch.Tensor, width: int) -> torch.Tensor:
    """A (d_out, r) tensor as a flat vector over the (d_out, width) grid, column by column (zeros
    in the columns beyond r).

    Column-major so that widening the grid (a later task of larger rank) only appends bits:
    packed rows of earlier tasks stay valid after zero-padding (see :meth:`ModuleStats._widen`).
    """
    grid = torch.zeros(width, x.shape[0], dtype=x.dtype)
    grid[: x.shape[1]] = x.T
    return grid.flatten()


def _pad_cols(array: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the last axis of ``array`` to ``width`` (``array`` itself when it is that wide:
    np.pad costs ~20 µs even for no padding, and every packed row of every task comes here)."""
    if array.shape[-1] == width:
        return array
    pad = [(0, 0)] * (array.ndim - 1) + [(0, width - array.shape[-1])]
    return np.pad(array, pad)


def _grow(matrix: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A (..., t, t) stack of symmetric matrices (one per ε level, or just one) bordered by ``row``
    (..., t + 1: the pairs with the new task, itself last) into a (..., t + 1, t + 1) one."""
    t = matrix.shape[-1]
    out = np.zeros((*matrix.shape[:-2], t + 1, t + 1), dtype=matrix.dtype)
    out[..., :t, :t] = matrix
    out[..., t, :] = row
    out[..., :, t] = row
    return out


# --- one module --------------------------------------------------------------------------------


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
            dw_bits=np.zeros((0, levels, _packed_bytes(pos.count)), dtype=np.uint8),
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
        b_bytes = _packed_bytes(self.shape[0] * width)
        return replace(
            self,
            width=width,
            singular=_pad_cols(self.singular, width),
            r_a=_pad_cols(np.pad(self.r_a, [(0, 0), (0, width - self.width), (0, 0)]), width),
            owned_bits=_pad_cols(self.owned_bits, b_bytes),
            b_bits=_pad_cols(self.b_bits, b_bytes),
        )

    def _append_absent(self) -> ModuleStats:
        pairs = {key: np.zeros((*getattr(self, key).shape[:-2], self.tasks + 1)) for key in _PAIR_FIELDS}
        return self._appended(None, (-1, -1), pairs)

    def _append_present(
        self, f: Factors, earlier: Sequence[Factors | None], params: StatsParams, grams: Products | None
    ) -> ModuleStats:
        p = profile_task(f, self.name, self.width, params)
        oo, awom = self._orthogonality(f, p, earlier, grams)
        pairs = {pair: _pair_counts(getattr(self, bits), getattr(p, bits)) for bits, pair in _COUNTED.items()}
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
            **{key: _grow(getattr(self, key), pairs[key]) for key in _PAIR_FIELDS},
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
    active = _active(magnitudes, max_abs, params.eps_levels)
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
        dw_bits=_pack(active),
        owned_bits=_pack(_b_positions(f.owned(), width)),
        b_bits=_pack(_active(_b_positions(b_abs, width), b_max, params.eps_levels)),
    )


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


# --- all modules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreStats:
    """The statistics of a sequence of tasks (oldest first), module by module."""

    params: StatsParams
    tasks: tuple[str, ...]  # task version ids, e.g. "alpha/v1"
    modules: dict[str, ModuleStats]

    def to_dict(self, *, module_matrices: bool = False) -> dict[str, Any]:
        """JSON-ready summary; see :func:`summary` for the schema."""
        return summary(self, module_matrices=module_matrices)


def compute_stats(
    tasks: Sequence[LoraAdapter] | FactorSource, names: Sequence[str], params: StatsParams | None = None
) -> StoreStats:
    """The statistics of ``tasks`` (oldest first), from scratch, one module at a time.

    Only one module's factors (of every task) are in memory at once when ``tasks`` is a lazy
    :class:`FactorSource`; ΔW is never formed for more than ``row_chunk`` rows at once.
    """
    params = params or StatsParams()
    source = as_source(tasks)
    if len(names) != len(source):
        raise ValueError(f"{len(names)} names for {len(source)} tasks")
    modules: dict[str, ModuleStats] = {}
    for module in source.module_names():
        factors = [source.factors(i, module) for i in range(len(source))]
        shape = next(f.shape for f in factors if f is not None)
        stats = ModuleStats.empty(module, shape, params)
        grams = ModuleGrams(factors)
        for t, f in enumerate(factors):
            stats = stats.append(f, factors[:t], params, grams)
        modules[module] = stats
    return StoreStats(params, tuple(names), modules)


def update_stats(
    previous: StoreStats, earlier: Sequence[LoraAdapter] | FactorSource, new: LoraAdapter, name: str
) -> StoreStats:
    """``previous`` plus one more task, without recomputing anything about earlier pairs.

    ``earlier`` are the tasks ``previous`` was computed from, oldest first; only their A and B
    are read (OO, AWOM), one module at a time. ``previous`` is not modified.
    """
    source = as_source(earlier)
    if len(source) != len(previous.tasks):
        raise ValueError(f"previous stats cover {len(previous.tasks)} tasks, got {len(source)} earlier ones")
    params, t = previous.params, len(previous.tasks)
    added = AdapterList([new])
    modules: dict[str, ModuleStats] = {}
    for module in sorted(set(previous.modules) | set(new.modules)):
        f = added.factors(0, module)
        stats = previous.modules.get(module)
        if stats is None:  # first task to adapt this module: the earlier ones were absent
            assert f is not None
            stats = ModuleStats.empty(module, f.shape, params)
            for i in range(t):
                stats = stats.append(None, [None] * i, params)
        earlier_factors = [source.factors(i, module) for i in range(t)] if f is not None else [None] * t
        modules[module] = stats.append(f, earlier_factors, params)
    return StoreStats(params, (*previous.tasks, name), modules)


# --- the JSON view -----------------------------------------------------------------------------


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
    union = _popcount(np.bitwise_or.reduce(s.owned_bits, axis=0)) if s.tasks else 0
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


def _aggregate(stats: StoreStats, views: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
    union = sum(_popcount(np.bitwise_or.reduce(s.owned_bits, axis=0)) for s in mods if s.tasks)
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


def _sign_share(stats: StoreStats, *, same: bool) -> list[float | None]:
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


def summary(stats: StoreStats, *, module_matrices: bool = False) -> dict[str, Any]:
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
