"""The math on one task's factors in one module: ΔW at the evaluated positions, the exact
max |ΔW|, ‖ΔW‖₁, the spectrum and the generalized sparsity.

Its own module because each function here is a measure with a reference computation in the
tests (a dense ΔW), independent of how tasks are compared and kept; none forms ΔW for more
than ``row_chunk`` rows at once.
"""

from __future__ import annotations

import math

import torch

from adapters_store.stats.factors import Factors
from adapters_store.stats.positions import Positions


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
