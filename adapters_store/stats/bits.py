"""Packed bit sets of active positions and the pair counts made from them.

Its own module because the incremental statistics keep, per task, bits instead of values
(a later task is compared against them with popcounts), and the packing must stay aligned
across tasks: whole 64-bit words, and B positions column-major so that a wider rank only
appends bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def packed_bytes(bits: int) -> int:
    """Bytes that hold ``bits`` packed bits, rounded up to whole 64-bit words: :func:`pair_counts`
    counts them as uint64, 2.5–4× faster than byte by byte (the zero padding never counts)."""
    return -(-bits // 64) * 8


def pack(bits: torch.Tensor) -> np.ndarray:
    """Bools packed along the last axis (8 positions a byte, then zero bytes up to whole words):
    (..., n) → (..., :func:`packed_bytes` (n))."""
    return pad_cols(np.packbits(bits.numpy(), axis=-1), packed_bytes(bits.shape[-1]))


def active_levels(magnitudes: torch.Tensor, peak: float, levels: Sequence[float]) -> torch.Tensor:
    """|x| > ε · peak for every ε of ``levels``: (n,) → (L, n) bool, one row per level.

    The comparison runs in float64 (as the reference does). With ascending levels every row is a
    subset of the one before, which makes CR non-increasing in ε. A zero peak activates nothing.
    """
    if peak <= 0:
        return torch.zeros(len(levels), magnitudes.numel(), dtype=torch.bool)
    thresholds = torch.tensor(levels, dtype=torch.float64).unsqueeze(1) * peak  # (L, 1)
    return magnitudes.flatten().double().unsqueeze(0) > thresholds


def pair_counts(rows: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The new task's row of a pair-count matrix: |row_i ∧ new| for every earlier task i, then
    |new| (the diagonal), from packed bits. rows (t, ..., nbytes), new (..., nbytes) → (..., t + 1)
    int64; the middle axes (ε levels) pass through."""
    rows, new = rows.view(np.uint64), new.view(np.uint64)  # rows are whole words (packed_bytes)
    earlier = np.bitwise_count(rows & new).sum(axis=-1, dtype=np.int64)  # (t, ...)
    own = np.bitwise_count(new).sum(axis=-1, dtype=np.int64)  # (...)
    return np.moveaxis(np.concatenate([earlier, np.asarray(own)[None]]), 0, -1)


def popcount(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


def b_grid(x: torch.Tensor, width: int) -> torch.Tensor:
    """A (d_out, r) tensor as a flat vector over the (d_out, width) grid, column by column (zeros
    in the columns beyond r).

    Column-major so that widening the grid (a later task of larger rank) only appends bits:
    packed rows of earlier tasks stay valid after zero-padding
    (see :meth:`~adapters_store.stats.module.ModuleStats._widen`).
    """
    grid = torch.zeros(width, x.shape[0], dtype=x.dtype)
    grid[: x.shape[1]] = x.T
    return grid.flatten()


def pad_cols(array: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the last axis of ``array`` to ``width`` (``array`` itself when it is that wide:
    np.pad costs ~20 µs even for no padding, and every packed row of every task comes here)."""
    if array.shape[-1] == width:
        return array
    pad = [(0, 0)] * (array.ndim - 1) + [(0, width - array.shape[-1])]
    return np.pad(array, pad)


def grow_pairs(matrix: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A (..., t, t) stack of symmetric matrices (one per ε level, or just one) bordered by ``row``
    (..., t + 1: the pairs with the new task, itself last) into a (..., t + 1, t + 1) one."""
    t = matrix.shape[-1]
    out = np.zeros((*matrix.shape[:-2], t + 1, t + 1), dtype=matrix.dtype)
    out[..., :t, :t] = matrix
    out[..., t, :] = row
    out[..., :, t] = row
    return out
