"""Statistics of the live task adapters: how much they share, collide and overlap (the admin view).

docs/api.md ("Store statistics") says what each figure tells an operator. Notation (PEFT's, as everywhere in Lamina): task t adds
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

**The package.** One module per job, the names above re-exported here:
:mod:`~adapters_store.stats.params` (parameters, schema), :mod:`~adapters_store.stats.factors`
(where the factors come from), :mod:`~adapters_store.stats.positions` (which ΔW positions are
evaluated), :mod:`~adapters_store.stats.measures` (the math on one task's factors),
:mod:`~adapters_store.stats.bits` (packed bit sets and pair counts),
:mod:`~adapters_store.stats.products` (the factor products OO and AWOM read),
:mod:`~adapters_store.stats.profile` (one task on its own), :mod:`~adapters_store.stats.module`
(one module, incrementally), :mod:`~adapters_store.stats.compute` (every module) and
:mod:`~adapters_store.stats.view` (the JSON view). The PNG is :mod:`adapters_store.stats_plot`,
the cache per store version :mod:`adapters_store.stats_cache`.
"""

from adapters_store.stats.compute import StoreStats, compute_stats, update_stats
from adapters_store.stats.factors import AdapterList, Factors, FactorSource, as_source
from adapters_store.stats.measures import delta_at, generalized_sparsity, l1_delta, max_abs_delta, spectrum
from adapters_store.stats.module import ModuleStats
from adapters_store.stats.params import STATS_SCHEMA, StatsParams, eps_key
from adapters_store.stats.positions import Positions, positions_for
from adapters_store.stats.products import ModuleGrams, PairProducts, Products
from adapters_store.stats.profile import TaskProfile, profile_task
from adapters_store.stats.view import summary

__all__ = [
    "AdapterList",
    "FactorSource",
    "Factors",
    "ModuleGrams",
    "ModuleStats",
    "PairProducts",
    "Positions",
    "Products",
    "STATS_SCHEMA",
    "StatsParams",
    "StoreStats",
    "TaskProfile",
    "as_source",
    "compute_stats",
    "delta_at",
    "eps_key",
    "generalized_sparsity",
    "l1_delta",
    "max_abs_delta",
    "positions_for",
    "profile_task",
    "spectrum",
    "summary",
    "update_stats",
]
