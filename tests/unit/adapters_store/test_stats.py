"""Store statistics against plain dense reference computations, on constructed
adapters whose numbers are known by hand, and through the store's cache."""

from __future__ import annotations

import json
import math
import struct
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from typer.testing import CliRunner

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.stats import (
    STATS_SCHEMA,
    Factors,
    StatsParams,
    compute_stats,
    delta_at,
    eps_key,
    max_abs_delta,
    positions_for,
    update_stats,
)
from adapters_store.stats_cache import STATS_DIR, stats_for_store
from adapters_store.stats_plot import acr_by_eps, render_stats_png
from adapters_store.store import AdapterStore
from server.cli import app

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (12, 10), V: (6, 10)}
EPS = 1e-3


def random_adapter(
    seed: int,
    rank: int = 3,
    density: float | None = None,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> LoraAdapter:
    """Random factors; ``density`` draws masks (B stored masked, as the trainer does)."""
    g = torch.Generator().manual_seed(seed)
    modules, masks = {}, {}
    for name, (d_out, d_in) in shapes.items():
        B = torch.randn(d_out, rank, generator=g)
        if density is not None:
            masks[name] = torch.rand(d_out, rank, generator=g) < density
            B = B * masks[name]
        modules[name] = LoraModule(A=torch.randn(rank, d_in, generator=g), B=B, scale=2.0 / rank)
    return LoraAdapter(modules=modules, masks=masks)


def names(n: int) -> list[str]:
    return [f"task{i}/v1" for i in range(n)]


# --- the reference: every definition applied to materialized float64 matrices ----------------


def delta(adapter: LoraAdapter, name: str) -> torch.Tensor:
    m = adapter.modules[name]
    B = m.B.double() * adapter.masks[name] if name in adapter.masks else m.B.double()
    return m.scale * B @ m.A.double()


def reference(adapters: list[LoraAdapter], name: str, eps: float = EPS) -> dict[str, object]:
    """N-LoRA eqs. 7–11 and 9, PS-LoRA Table 6, occupancy and overlap, from dense matrices."""

    def active(x: torch.Tensor) -> torch.Tensor:
        return x.abs() > eps * x.abs().max()

    W = [delta(a, name) for a in adapters]
    width = max(a.modules[name].rank for a in adapters)

    def grid(x: torch.Tensor) -> torch.Tensor:  # (d_out, r) → (d_out, width)
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    Bs = [grid(a.modules[name].B.double()) for a in adapters]
    masks = [grid(a.masks.get(name, torch.ones_like(a.modules[name].B, dtype=torch.bool))) for a in adapters]
    As = [a.modules[name].A.double() for a in adapters]
    t = len(adapters)
    cr = [[float((active(W[i]) & active(W[j])).double().mean()) for j in range(t)] for i in range(t)]
    cr_b = [[float((active(Bs[i]) & active(Bs[j])).double().mean()) for j in range(t)] for i in range(t)]
    overlap = [[float((masks[i] & masks[j]).double().mean()) for j in range(t)] for i in range(t)]
    oo = [[float((As[i] @ As[j].T).square().sum()) for j in range(t)] for i in range(t)]
    awom = [[float(torch.linalg.matrix_norm(W[i].T @ W[j], ord=2)) for j in range(t)] for i in range(t)]
    union = torch.zeros_like(masks[0])
    for m in masks:
        union |= m
    same: list[float | None] = [None]
    opposite: list[float | None] = [None]
    S = W[0].clone()
    for k in range(1, t):
        agree = torch.sign(W[k]) * torch.sign(S)
        same.append(float((active(W[k]) & (agree > 0)).double().mean()))
        opposite.append(float((active(W[k]) & (agree < 0)).double().mean()))
        S += W[k]
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    return {
        "cr_dw": cr,
        "cr_b": cr_b,
        "mask_overlap": overlap,
        "oo": oo,
        "awom": awom,
        "acr_dw": sum(cr[i][j] for i, j in pairs) / len(pairs),
        "acr_b": sum(cr_b[i][j] for i, j in pairs) / len(pairs),
        "occupancy": float(union.double().mean()),
        "task_share": [float(m.double().mean()) for m in masks],
        "oo_per_task": [sum(oo[i][k] for i in range(k)) for k in range(t)],
        "awom_per_task": [sum(awom[i][k] for i in range(k)) for k in range(t)],
        "sparsity": [float(w.abs().sum() / (math.sqrt(w.numel()) * w.norm())) for w in W],
        "nuclear_norm": [float(torch.linalg.matrix_norm(w, ord="nuc")) for w in W],
        "effective_rank": [
            float(torch.linalg.matrix_norm(w, ord="nuc") / torch.linalg.matrix_norm(w, ord=2)) for w in W
        ],
        "sign_same": same,
        "sign_opposite": opposite,
        "max_abs": [float(w.abs().max()) for w in W],
    }


def flat(value: object) -> list[float]:
    """Numbers, lists and matrices as one flat list, None as NaN (for pytest.approx)."""
    if isinstance(value, list):
        return [x for item in value for x in flat(item)]
    return [math.nan if value is None else float(value)]  # type: ignore[arg-type]


def close(got: object, want: object) -> bool:
    return flat(got) == pytest.approx(flat(want), rel=1e-5, abs=1e-9, nan_ok=True)


def assert_same_view(got: object, want: object, where: str = "") -> None:
    """Two JSON views equal: structure, counts and flags exactly, floats to fp32 rounding (a
    full computation sums the OO/AWOM products in another order than an update)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_view(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_view(g, w, f"{where}[{k}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), where
    else:
        assert got == want, where


def assert_matches(view: dict[str, object], expected: dict[str, object]) -> None:
    for key, value in expected.items():
        assert close(view[key], value), key


# --- exact on small modules ---------------------------------------------------------------------


@pytest.mark.parametrize("density", [None, 0.5])
def test_every_measure_matches_the_dense_reference(density: float | None) -> None:
    adapters = [random_adapter(seed, density=density) for seed in range(4)]
    view = compute_stats(adapters, names(4), StatsParams(eps=EPS)).to_dict(module_matrices=True)
    for name in SHAPES:
        module = view["modules"][name]
        assert module["exact"] and module["cr_standard_error_max"] == 0.0
        assert_matches(module, reference(adapters, name))


def test_constructed_overlap_gives_the_hand_computed_numbers() -> None:
    """Module 8 × 6, rank 2. Task 0 owns B rows 0–3 and has A = 1 (all 6 columns); task 1 owns
    rows 2–5 and has A = 2 on columns 0–2 only. Every B entry it owns is 1, so ΔW_t is constant
    on its rows (and columns) and 0 elsewhere: no entry sits near the ε threshold."""
    d_out, d_in = 8, 6
    masks = [torch.zeros(d_out, 2, dtype=torch.bool) for _ in range(2)]
    masks[0][0:4] = True
    masks[1][2:6] = True
    A0 = torch.ones(2, d_in)
    A1 = torch.zeros(2, d_in)
    A1[:, :3] = 2.0
    adapters = [
        LoraAdapter({Q: LoraModule(A=A, B=m.float(), scale=1.0)}, {Q: m})
        for A, m in zip([A0, A1], masks, strict=True)
    ]
    view = compute_stats(adapters, names(2)).to_dict(module_matrices=True)
    module = view["modules"][Q]
    assert module["occupancy"] == 0.75  # rows 0–5 of 8
    assert module["b_positions_free"] == 4
    assert module["task_share"] == [0.5, 0.5]
    assert module["mask_overlap"] == [[0.5, 0.25], [0.25, 0.5]]  # rows 2–3
    assert module["cr_b"] == module["mask_overlap"]
    # ΔW_0 ≠ 0 on rows 0–3 × all columns (24 of 48), ΔW_1 on rows 2–5 × columns 0–2 (12 of 48);
    # both on rows 2–3 × columns 0–2: 6 of 48.
    assert module["cr_dw"] == [[0.5, 0.125], [0.125, 0.25]]
    assert module["acr_dw"] == 0.125
    # A_0 A_1ᵀ = 6 everywhere (2 × 2): ‖·‖_F² = 4 · 36; A_0 A_0ᵀ = 6, A_1 A_1ᵀ = 12.
    assert module["oo"] == [[144.0, 144.0], [144.0, 576.0]]
    assert module["oo_per_task"] == [0.0, 144.0]
    # half the rows non-zero and constant: ‖ΔW‖₁ / (√(mn)‖ΔW‖_F) = √(24/48)
    assert module["sparsity"][0] == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert module["effective_rank"] == [1.0, 1.0]  # every ΔW here is rank 1
    assert module["sign_same"] == [None, 0.125] and module["sign_opposite"] == [None, 0.0]
    assert view["aggregate"]["cr_dw"] == module["cr_dw"]


def test_loraf_masks_never_overlap_and_occupancy_is_the_sum_of_shares() -> None:
    """LoRAF: one shared A, disjoint masks cut from one permutation of the B positions."""
    d_out, rank, tasks = 12, 4, 5
    shared_A = torch.randn(rank, 10, generator=torch.Generator().manual_seed(7))
    order = torch.randperm(d_out * rank, generator=torch.Generator().manual_seed(8))
    sizes = [3, 5, 7, 9, 11]
    adapters, start = [], 0
    for t, size in enumerate(sizes):
        mask = torch.zeros(d_out * rank, dtype=torch.bool)
        mask[order[start : start + size]] = True
        start += size
        mask = mask.view(d_out, rank)
        B = torch.randn(d_out, rank, generator=torch.Generator().manual_seed(t)) * mask
        adapters.append(LoraAdapter({Q: LoraModule(A=shared_A, B=B, scale=1.0)}, {Q: mask}))
    view = compute_stats(adapters, names(tasks)).to_dict(module_matrices=True)
    for scope in (view["modules"][Q], view["aggregate"]):
        overlap = scope["mask_overlap"]
        assert all(overlap[i][j] == 0.0 for i in range(tasks) for j in range(tasks) if i != j)
        assert scope["task_share"] == pytest.approx([s / (d_out * rank) for s in sizes], rel=1e-5)
        assert scope["occupancy"] == pytest.approx(sum(sizes) / (d_out * rank), rel=1e-5)
        assert scope["occupancy"] == pytest.approx(sum(scope["task_share"]), rel=1e-5)
        assert scope["b_positions_free"] == d_out * rank - sum(sizes)


def test_sparsity_is_in_0_1_and_1_for_a_constant_matrix() -> None:
    big = {Q: (300, 250)}  # 75 000 positions: sampled below
    constant = LoraAdapter(
        {Q: LoraModule(A=torch.full((1, 250), 0.5), B=torch.full((300, 1), 3.0), scale=2.0)}
    )
    one_hot_A, one_hot_B = torch.zeros(1, 250), torch.zeros(300, 1)
    one_hot_A[0, 7], one_hot_B[11, 0] = 1.0, 1.0
    single = LoraAdapter({Q: LoraModule(A=one_hot_A, B=one_hot_B, scale=1.0)})
    exact, sampled = StatsParams(exact_up_to=100_000), StatsParams(exact_up_to=0, sample_size=4096)
    for params in (exact, sampled):
        sparsity = compute_stats([constant, single], names(2), params).to_dict()["modules"][Q]["sparsity"]
        assert sparsity[0] == 1.0
        assert 0.0 < sparsity[1] <= 1.0
        if params is exact:  # a single non-zero entry: 1/√(mn)
            assert sparsity[1] == pytest.approx(1 / math.sqrt(300 * 250), rel=1e-5)
    randoms = [random_adapter(s, density=0.3, shapes=big) for s in range(3)]
    for params in (exact, sampled):
        for value in compute_stats(randoms, names(3), params).to_dict()["modules"][Q]["sparsity"]:
            assert 0.0 < value <= 1.0


# --- several thresholds ε -------------------------------------------------------------------------


def weighted(matrices: list[object], weights: list[int]) -> list[list[float]]:
    """Σ_m w_m · matrix_m / Σ_m w_m: the aggregate of per-module shares (each weighs by its size)."""
    total = np.sum([np.array(m, dtype=float) * w for m, w in zip(matrices, weights, strict=True)], axis=0)
    return (total / sum(weights)).tolist()


def mean_pairs(matrix: list[list[float]]) -> float:
    t = len(matrix)
    return sum(matrix[i][j] for i in range(t) for j in range(i + 1, t)) / (t * (t - 1) / 2)


@pytest.mark.parametrize("density", [None, 0.5])
def test_collisions_at_every_eps_match_the_dense_reference(density: float | None) -> None:
    """Every level against thresholds applied by hand to the dense ΔW and B, per module and over
    all modules; the plain keys are those of the primary ε (here not the first level)."""
    adapters = [random_adapter(seed, density=density) for seed in range(4)]
    params = StatsParams(eps=1e-2, eps_levels=(0.0, 1e-3, 1e-2, 0.1, 0.5))
    view = compute_stats(adapters, names(4), params).to_dict(module_matrices=True)
    dw_sizes = [d_out * d_in for d_out, d_in in SHAPES.values()]
    b_sizes = [d_out * 3 for d_out, _ in SHAPES.values()]  # rank 3 everywhere
    for eps in params.eps_levels:
        key = eps_key(eps)
        expected = [reference(adapters, name, eps) for name in SHAPES]
        for name, want in zip(SHAPES, expected, strict=True):
            module = view["modules"][name]
            for field in ("cr_dw", "acr_dw", "cr_b", "acr_b"):
                assert close(module[f"{field}_by_eps"][key], want[field]), (name, field, eps)
        for space, sizes in (("dw", dw_sizes), ("b", b_sizes)):
            cr = weighted([want[f"cr_{space}"] for want in expected], sizes)
            assert close(view["aggregate"][f"cr_{space}_by_eps"][key], cr), (space, eps)
            assert close(view["aggregate"][f"acr_{space}_by_eps"][key], mean_pairs(cr)), (space, eps)
    for scope in (view["aggregate"], *view["modules"].values()):
        assert (
            scope["acr_dw"] == scope["acr_dw_by_eps"]["0.01"]
            and scope["cr_b"] == scope["cr_b_by_eps"]["0.01"]
        )


def test_collision_rates_never_grow_with_eps() -> None:
    """A larger ε activates a subset of the positions, so CR of every pair can only fall: on a
    fine grid of levels, in ΔW and B space, for a sampled and an exact module and the aggregate."""
    levels = tuple(float(e) for e in np.geomspace(1e-4, 0.9, 12))
    params = StatsParams(eps=levels[0], eps_levels=levels, exact_up_to=100, sample_size=512)
    view = compute_stats([random_adapter(s, density=0.7) for s in range(4)], names(4), params).to_dict(
        module_matrices=True
    )
    assert not view["modules"][Q]["exact"] and view["modules"][V]["exact"]
    for scope in (view["aggregate"], *view["modules"].values()):
        for space in ("dw", "b"):
            cr = np.array([scope[f"cr_{space}_by_eps"][eps_key(e)] for e in levels])  # (L, t, t)
            assert (np.diff(cr, axis=0) <= 0).all(), space
            acr = [scope[f"acr_{space}_by_eps"][eps_key(e)] for e in levels]
            assert all(a >= b for a, b in pairwise(acr)), space
            assert acr[-1] < acr[0], space  # the levels do change the rates: the check above bites


def test_json_reports_every_eps_and_keeps_the_single_eps_keys() -> None:
    """Readers of schema 1 (the benchmark reads aggregate["acr_dw"]) get the primary ε = 1e-3."""
    adapters = [random_adapter(s) for s in range(3)]
    view = compute_stats(adapters, names(3)).to_dict(module_matrices=True)
    levels = ["0.001", "0.01", "0.1"]
    assert view["schema"] == STATS_SCHEMA == 2 and view["params"]["eps_levels"] == [0.001, 0.01, 0.1]
    for scope in (view["aggregate"], *view["modules"].values()):
        for space in ("dw", "b"):
            for kind in ("cr", "acr"):
                by_eps = scope[f"{kind}_{space}_by_eps"]
                assert list(by_eps) == levels
                assert scope[f"{kind}_{space}"] == by_eps["0.001"]
    assert view["aggregate"]["acr_dw_by_eps"]["0.1"] < view["aggregate"]["acr_dw_by_eps"]["0.001"]
    without_matrices = compute_stats(adapters, names(3)).to_dict()["modules"][Q]
    assert "acr_dw_by_eps" in without_matrices and "cr_dw_by_eps" not in without_matrices
    assert json.loads(json.dumps(view)) == view


def test_eps_levels_are_validated_and_always_hold_the_primary() -> None:
    for bad in ((0.1, 0.01), (0.01, 0.01), (0.01, 1.0), (-0.1, 0.01), (math.nan,)):
        with pytest.raises(ValueError):
            StatsParams(eps_levels=bad)
    params = StatsParams(eps=0.05)
    assert params.eps_levels == (0.001, 0.01, 0.05, 0.1) and params.eps_levels[params.primary] == 0.05
    # a cached file's header (JSON: a list) gives the same params back, so cache keys match
    assert StatsParams(**json.loads(json.dumps(params.as_dict()))) == params
    assert json.loads(json.dumps(params.as_dict())) == params.as_dict()


# --- incremental = full ----------------------------------------------------------------------


def test_incremental_update_equals_full_recomputation() -> None:
    """Also with a task that skips a module, a module that first appears later, and growing ranks."""
    adapters = [
        random_adapter(0, rank=2, density=0.6),
        random_adapter(1, rank=3, shapes={Q: SHAPES[Q]}),  # no v_proj
        random_adapter(2, rank=4, density=0.4, shapes={**SHAPES, "extra": (5, 7)}),
        random_adapter(3, rank=3, density=0.5),
    ]
    params = StatsParams(
        exact_up_to=64, sample_size=64
    )  # q_proj (120 positions) is sampled, v_proj (60) exact
    stats = compute_stats(adapters[:1], names(1), params)
    for t in range(1, len(adapters)):
        stats = update_stats(stats, adapters[:t], adapters[t], names(t + 1)[-1])
    full = compute_stats(adapters, names(len(adapters)), params)
    assert_same_view(stats.to_dict(module_matrices=True), full.to_dict(module_matrices=True))
    for name, module in full.modules.items():  # the counts behind every ε level, exactly
        for key in ("dw_pairs", "b_pairs", "dw_bits", "b_bits"):
            assert np.array_equal(getattr(stats.modules[name], key), getattr(module, key)), (name, key)
        assert module.dw_pairs.shape == (len(params.eps_levels), 4, 4)
    view = full.to_dict()
    assert view["modules"][V]["sparsity"][1] is None  # task 1 does not adapt v_proj
    assert view["modules"]["extra"]["sign_same"][2] is None  # no earlier task adapted "extra"
    assert view["modules"][V]["rank"] == 4


# --- sampled large modules ---------------------------------------------------------------------


def test_sampled_estimates_are_within_their_standard_error() -> None:
    shape = {Q: (200, 180)}  # 36 000 positions, sampled at 8 192
    adapters = [random_adapter(s, rank=4, density=0.35, shapes=shape) for s in range(3)]
    # ε = 0.2 so that the active share is far from 0 and 1 and the estimate is informative
    params = StatsParams(eps=0.2, exact_up_to=0, sample_size=8192)
    module = compute_stats(adapters, names(3), params).to_dict(module_matrices=True)["modules"][Q]
    assert not module["exact"]
    expected = reference(adapters, Q, eps=0.2)
    bound = 4 * module["cr_standard_error_max"]  # 4 standard errors
    for i in range(3):
        for j in range(3):
            assert abs(module["cr_dw"][i][j] - expected["cr_dw"][i][j]) < bound
    for key in ("sign_same", "sign_opposite"):
        for got, want in zip(module[key][1:], expected[key][1:], strict=True):
            assert abs(got - want) < bound
    # exact whatever the sampling: the max behind the threshold, B space, OO, AWOM, norms
    for key in ("max_abs", "cr_b", "mask_overlap", "oo", "awom", "nuclear_norm", "occupancy"):
        assert close(module[key], expected[key]), key


@pytest.mark.parametrize("row_chunk", [1, 7, 64])
def test_pruned_max_is_the_exact_max(row_chunk: int) -> None:
    g = torch.Generator().manual_seed(3)
    cases = [
        Factors(A=torch.randn(6, 300, generator=g), B=torch.randn(257, 6, generator=g).exp(), scale=-0.7)
        for _ in range(5)
    ]
    cases.append(Factors(A=torch.ones(6, 300), B=torch.ones(257, 6), scale=0.5))  # no row can be pruned
    for f in cases:
        dense = f.scale * f.B.double() @ f.A.double()
        assert max_abs_delta(f, row_chunk) == pytest.approx(float(dense.abs().max()), rel=1e-6)


def test_sampled_values_are_the_entries_of_delta() -> None:
    f = Factors(A=torch.randn(3, 90), B=torch.randn(80, 3), scale=1.5)
    params = StatsParams(exact_up_to=0, sample_size=500)
    pos = positions_for("m", (80, 90), params)
    dense = f.scale * f.B.double() @ f.A.double()
    assert delta_at(f, pos, 16) == pytest.approx(dense[pos.rows, pos.cols], rel=1e-5, abs=1e-6)
    assert torch.equal(pos.rows, positions_for("m", (80, 90), params).rows)  # seeded


def test_unmasked_B_is_refused() -> None:
    """A B with entries outside its mask would give another ΔW than the merges build."""
    adapter = random_adapter(0, density=0.5)
    module = adapter.modules[Q]
    adapter.modules[Q] = LoraModule(A=module.A, B=module.B + 1.0, scale=module.scale)
    with pytest.raises(ValueError, match="outside its mask"):
        compute_stats([adapter], names(1))


def test_params_are_validated() -> None:
    for bad in ({"eps": -0.1}, {"eps": 1.0}, {"sample_size": 0}, {"exact_up_to": -1}, {"row_chunk": 0}):
        with pytest.raises(ValueError):
            StatsParams(**bad)


# --- the store cache ----------------------------------------------------------------------------


def test_store_stats_are_cached_and_incremental(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store", "0123456789abcdef", base_model="tiny")
    assert stats_for_store(store)["tasks"] == []
    adapters = [random_adapter(s, density=0.5) for s in range(3)]
    meta = {"method": "lori-s"}
    for t, adapter in enumerate(adapters[:2]):
        store.publish(f"task{t}", adapter, meta, "concat")
    first = stats_for_store(store)
    assert first["computed"]["mode"] == "full" and not first["cache_hit"]
    assert stats_for_store(store)["cache_hit"]
    store.publish("task2", adapters[2], meta, "concat")
    third = stats_for_store(store, module_matrices=True)
    assert third["computed"]["mode"] == "incremental"
    third_merge = store.live().id
    expected = compute_stats(store.history(), [t.id for t in store.tasks()]).to_dict(module_matrices=True)
    for key in ("tasks", "aggregate", "modules", "params"):
        assert_same_view(third[key], expected[key], key)
    assert third["store_version"] == {"merge": store.live().id, "tasks": expected["tasks"]}
    # removal: not an append, so a full recomputation; then it is cached too
    store.remove_task("task1")
    after = stats_for_store(store)
    assert after["computed"]["mode"] == "full" and after["tasks"] == ["task0/v1", "task2/v1"]
    # rollback to a version computed before: served from the cache
    store.rollback(third_merge)
    assert stats_for_store(store, module_matrices=True)["cache_hit"]
    files = {p.name for p in (store.root / STATS_DIR).iterdir()}
    assert any(name.endswith(".state.safetensors") for name in files)
    assert not any(name.startswith(".tmp-") for name in files)
    json.dumps(after)  # JSON-ready


def test_cached_view_of_another_schema_is_recomputed(tmp_path: Path) -> None:
    """A view cached before the ε levels existed lacks their keys: it must not be served."""
    store = AdapterStore(tmp_path / "store", "0123456789abcdef", base_model="tiny")
    for t in range(2):
        store.publish(f"task{t}", random_adapter(t), {"method": "inc-lora"}, "concat")
    stats_for_store(store)
    assert stats_for_store(store)["cache_hit"]  # cached; now make it an older schema's file
    live = store.live()
    assert live is not None
    path = store.root / STATS_DIR / f"{live.id}.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "schema": 1}))
    again = stats_for_store(store)
    assert not again["cache_hit"] and again["schema"] == STATS_SCHEMA
    assert "acr_dw_by_eps" in again["aggregate"]


# --- the picture ----------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_valid_and_grows_with_the_number_of_tasks() -> None:
    small = compute_stats([random_adapter(s) for s in range(2)], names(2)).to_dict()
    large = compute_stats([random_adapter(s) for s in range(9)], names(9)).to_dict()
    (w2, h2), (w9, h9) = png_size(render_stats_png(small)), png_size(render_stats_png(large))
    assert w9 * h9 > w2 * h2 and h9 >= h2 and w9 >= w2
    empty = png_size(render_stats_png(compute_stats([], []).to_dict()))
    assert empty[0] > 0
    one = png_size(render_stats_png(compute_stats([random_adapter(0)], names(1)).to_dict()))
    assert one[0] > 0  # no pair: the ACR panel says so instead of plotting


def test_acr_panel_plots_the_json_values_against_eps_on_a_log_axis() -> None:
    view = compute_stats([random_adapter(s) for s in range(3)], names(3)).to_dict()
    ax = Figure().subplots()
    acr_by_eps(ax, view["aggregate"], view["params"]["eps"])
    lines = {line.get_label(): line for line in ax.lines}
    assert ax.get_xscale() == "log"
    for label, space in (("ΔW", "dw"), ("B", "b")):
        xs, ys = np.asarray(lines[label].get_xdata()), np.asarray(lines[label].get_ydata())
        assert xs.tolist() == [0.001, 0.01, 0.1]
        assert ys.tolist() == list(view["aggregate"][f"acr_{space}_by_eps"].values())
    assert np.asarray(lines["ε of the heatmap (0.001)"].get_xdata()).tolist() == [0.001, 0.001]
    # ε = 0 has no place on a log axis: symmetric-log, and the point is kept
    zero = StatsParams(eps=0.0, eps_levels=(0.0, 0.01))
    view = compute_stats([random_adapter(s) for s in range(2)], names(2), zero).to_dict()
    ax = Figure().subplots()
    acr_by_eps(ax, view["aggregate"], 0.0)
    assert ax.get_xscale() == "symlog" and np.asarray(ax.lines[0].get_xdata()).tolist() == [0.0, 0.01]
    ax = Figure().subplots()
    acr_by_eps(ax, compute_stats([random_adapter(0)], names(1)).to_dict()["aggregate"])
    assert not ax.lines and [text.get_text() for text in ax.texts] == ["needs two tasks"]


def test_cli_prints_acr_at_every_eps(
    base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store", fingerprint_model(base_model_dir))
    for t in range(2):
        store.publish(f"task{t}", random_adapter(t), {"method": "inc-lora"}, merge="concat")
    monkeypatch.setenv("LAMINA_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LAMINA_MODEL", str(base_model_dir))
    result = CliRunner().invoke(app, ["stats"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    table = result.output.split("ACR at several ε")[1].split("Per task")[0]
    acr = compute_stats(store.history(), names(2)).to_dict()["aggregate"]["acr_dw_by_eps"]
    for eps, value in acr.items():
        assert any(eps in row and f"{value:.4g}" in row for row in table.splitlines()), eps


def test_the_accuracy_matrix_is_a_heat_map_with_a_cell_per_task_and_the_base() -> None:
    from adapters_store.stats_plot import accuracy_heatmap

    matrix = [
        {"after": "a/v1", "row": {"a": 100.0}, "general": {"agreement": 100.0, "n": 10}},
        {"after": "b/v1", "row": {"a": 90.0, "b": 75.0}, "general": {"agreement": 97.0, "n": 10}},
    ]
    fig = Figure()
    ax = fig.subplots()
    accuracy_heatmap(fig, ax, matrix)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base (general)", "a", "b"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a/v1", "b/v1"]
    assert sorted(t.get_text() for t in ax.texts) == ["100", "100", "75", "90", "97"]  # b before b: blank
    view = compute_stats([random_adapter(s) for s in range(2)], names(2)).to_dict()
    plain = png_size(render_stats_png(view))
    with_matrix = png_size(render_stats_png({**view, "accuracy_matrix": matrix}))
    assert with_matrix[0] > plain[0]
