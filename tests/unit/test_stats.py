"""Store statistics against plain dense reference computations (STYLE.md item 9), on constructed
adapters whose numbers are known by hand, and through the store's cache."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.stats import (
    Factors,
    StatsParams,
    compute_stats,
    delta_at,
    max_abs_delta,
    positions_for,
    update_stats,
)
from adapters_store.stats_cache import STATS_DIR, stats_for_store
from adapters_store.stats_plot import render_stats_png
from adapters_store.store import AdapterStore

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
