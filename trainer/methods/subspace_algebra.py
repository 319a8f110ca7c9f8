"""The linear algebra of inflora's protected input subspace, as plain functions of tensors.

U (d_in, k) is an orthonormal basis of the input directions the live tasks use; its complement
is where a new task's frozen A may point. :func:`grow_basis` extends U by a task's input
covariance (GPM), :func:`project_rows` moves a random A into the complement (LoRI's A, made
harmless), :func:`leading_free_directions` picks the complement's directions where the new
task's own inputs have the most energy (InfLoRA's A). Tested against dense references.
"""

from __future__ import annotations

import torch

from adapters_store.subspace import orthonormalize

# _free_eigen solves in span(U)'s complement once k ≥ d_in / COMPLEMENT_FROM (measured on 2 cores,
# d_in 1536: 3× faster at k = 0.7 d_in, 30 % slower at k = 0.05 d_in, about even at k = 0.2 d_in).
COMPLEMENT_FROM = 5


def off_subspace(A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """A (I − U Uᵀ): each row with its component in span(U) removed, not rescaled, so the
    product B A loses exactly its action on span(U)'s inputs and nothing else."""
    return A - (A @ U) @ U.T  # (r, d_in)


def project_rows(A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """A ← A (I − U Uᵀ), each row rescaled to its original norm.

    The projector is never formed: (A U) Uᵀ costs r · d_in · k. Rescaling keeps the adapter's
    scale (s = alpha / r) meaning what it means for LoRI's unprojected A.
    """
    if U.shape[1] == 0:
        return A.clone()
    projected = off_subspace(A, U)  # (r, d_in)
    norms = projected.norm(dim=1, keepdim=True)  # (r, 1)
    if bool((norms <= 1e-6 * A.norm(dim=1, keepdim=True)).any()):
        raise ValueError("a row of A lies in the protected subspace; too few free directions")
    return projected * (A.norm(dim=1, keepdim=True) / norms)


def grow_basis(U: torch.Tensor | None, C: torch.Tensor, energy: float) -> torch.Tensor:
    """Extend the orthonormal basis U (d_in, k) so that it holds ``energy`` of tr(C) (GPM).

    C is one task's input covariance (d_in, d_in). Directions are added in order of the
    residual covariance's eigenvalues; none when U already holds enough.
    """
    d_in = C.shape[0]
    C = C.double()
    U = C.new_zeros(d_in, 0) if U is None else U.double()
    total = float(torch.trace(C))
    if total <= 0:
        return U.float()
    CU = C @ U  # (d_in, k)
    held = float((U * CU).sum())  # tr(Uᵀ C U)
    needed = energy * total - held
    if needed <= 0 or U.shape[1] == d_in:
        return U.float()
    values, vectors = _free_eigen(C, U)
    count = _directions_for(values, needed, d_in - U.shape[1])
    return _extended(U, vectors[:, :count])


def grow_basis_from_rows(U: torch.Tensor | None, X: torch.Tensor, energy: float) -> torch.Tensor:
    """:func:`grow_basis` for C = XᵀX, given the task's input rows X (n, d_in) instead of C.

    For n < d_in this is the cheaper form: the residual rows R = X (I − UUᵀ) (n, d_in) have the
    residual covariance RᵀR, whose eigenvectors with nonzero eigenvalue are Rᵀw/√λ for the
    eigenpairs (λ, w) of the n × n Gram matrix RRᵀ. Same directions as :func:`grow_basis` on XᵀX
    (up to round-off), at O(n·d_in·k + n²·d_in) instead of O(d_in³).
    """
    X = X.double()  # (n, d_in)
    d_in = X.shape[1]
    U = X.new_zeros(d_in, 0) if U is None else U.double()
    total = float(X.square().sum())  # tr(XᵀX)
    if total <= 0:
        return U.float()
    XU = X @ U  # (n, k)
    held = float(XU.square().sum())  # tr(Uᵀ XᵀX U)
    needed = energy * total - held
    if needed <= 0 or U.shape[1] == d_in:
        return U.float()
    R = X - XU @ U.T  # (n, d_in): the rows outside span(U)
    values, W = torch.linalg.eigh(R @ R.T)  # (n,), (n, n), ascending
    values, W = values.flip(0).clamp(min=0), W.flip(1)
    defined = int((values > 1e-12 * float(values[0])).sum())  # Rᵀw/√λ needs λ > 0
    count = min(_directions_for(values, needed, d_in - U.shape[1]), defined)
    fresh = (R.T @ W[:, :count]) / values[:count].sqrt()  # (d_in, count), orthonormal
    return _extended(U, fresh)


def _directions_for(values: torch.Tensor, needed: float, free: int) -> int:
    """How many leading eigenvalues (descending) it takes to hold ``needed`` energy, at most ``free``."""
    count = int(torch.searchsorted(values.cumsum(0), torch.tensor(needed, dtype=values.dtype))) + 1
    return min(count, free, len(values))


def _extended(U: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """[U, fresh'] (fp32) with fresh' an orthonormal basis of fresh (d_in, m) made orthogonal to U
    again (the eigensolvers' round-off). U is kept as it is: re-orthonormalizing all k + m columns
    would cost O(d_in·(k + m)²), the largest step of a late task's growth."""
    fresh = fresh - U @ (U.T @ fresh)
    return torch.cat([U, orthonormalize(fresh)], dim=1).float()


def leading_free_directions(
    C: torch.Tensor, U: torch.Tensor | None, count: int
) -> tuple[torch.Tensor, float]:
    """The ``count`` orthonormal directions outside span(U) that hold the most of C's energy,
    as rows (count, d_in), and the share of tr(C) they hold.

    Fewer than ``count`` directions with energy (a task of a handful of tokens) are completed by
    other directions of the complement (zero-energy eigenvectors), so A always has full rank.
    """
    d_in = C.shape[0]
    U = C.new_zeros(d_in, 0, dtype=torch.float64) if U is None else U.double()
    if d_in - U.shape[1] < count:
        raise ValueError(f"{d_in - U.shape[1]} free directions, {count} wanted")
    C = C.double()
    total = float(torch.trace(C))
    # A small ridge δ·I gives every free direction an eigenvalue ≥ δ and span(U) exactly 0, so the
    # completing directions come from the complement, never from span(U).
    ridge = 1e-9 * max(total, 1e-30) / d_in
    values, vectors = _free_eigen(C + ridge * torch.eye(d_in, dtype=C.dtype), U)
    chosen = vectors[:, :count]  # (d_in, count)
    chosen = orthonormalize(chosen - U @ (U.T @ chosen))
    held = float((values[:count] - ridge).clamp(min=0).sum()) / total if total > 0 else 0.0
    return chosen.T.float(), held


def _free_eigen(C: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, ≥ 0) and eigenvectors of (I − UUᵀ) C (I − UUᵀ), in fp64,
    without forming I − UUᵀ.

    Once U holds a fifth of d_in or more, the problem is solved in the complement itself: with Q
    (d_in, d_in − k) an orthonormal basis of span(U)⊥ (the trailing columns of U's complete QR),
    the eigenpairs of QᵀCQ give the d_in − k directions outside span(U), and the eigensolver's
    O(n³) runs on n = d_in − k (a full module's basis makes it several times cheaper). Below that,
    the residual is formed in place and decomposed whole: its eigenvectors with nonzero eigenvalue
    lie outside span(U); the zero ones include span(U) itself, which the sort puts last.
    """
    d_in, k = U.shape
    if k * COMPLEMENT_FROM >= d_in:
        Q = torch.linalg.qr(U, mode="complete").Q[:, k:]  # (d_in, d_in − k), ⟂ span(U)
        values, W = torch.linalg.eigh(Q.T @ C @ Q)  # ascending
        return values.flip(0).clamp(min=0), Q @ W.flip(1)
    CU = C @ U  # (d_in, k)
    residual = C - U @ CU.T - CU @ U.T + U @ (U.T @ CU) @ U.T  # (d_in, d_in)
    values, vectors = torch.linalg.eigh((residual + residual.T) / 2)  # ascending
    return values.flip(0).clamp(min=0), vectors.flip(1)
