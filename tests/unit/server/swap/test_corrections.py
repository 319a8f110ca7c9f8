"""Correction adapters (server/swap/corrections.py) against plain reference arithmetic: with the live
merge in the weights, W0 + ΔW_live + C must be the model asked for, exactly when C's rank fits,
and with the relative error it reports when it does not."""

from __future__ import annotations

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.merges import DenseDelta, build_merge
from server.swap.corrections import correction, reconstruct

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.down_proj": (16, 40)}


def _task(seed: int, rank: int = 4, alpha: float = 8.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            name: LoraModule(
                A=torch.randn(rank, d_in, generator=g),
                B=torch.randn(d_out, rank, generator=g),
                scale=alpha / rank,
            )
            for name, (d_out, d_in) in SHAPES.items()
        }
    )


def _delta(adapter: LoraAdapter | None) -> dict[str, torch.Tensor]:
    return reconstruct(adapter, SHAPES)


def _live_delta(live: LoraAdapter | DenseDelta) -> dict[str, torch.Tensor]:
    if isinstance(live, DenseDelta):
        return {name: d.double() for name, d in live.deltas.items()}
    return _delta(live)


def _assert_served(
    target: LoraAdapter | None, live: LoraAdapter | DenseDelta, got: LoraAdapter | None
) -> None:
    """live + correction == target, per module, to fp32 rounding."""
    want, have, fix = _delta(target), _live_delta(live), _delta(got)
    for name in SHAPES:
        torch.testing.assert_close(have[name] + fix[name], want[name], rtol=0, atol=1e-4)


def test_base_under_a_concat_merge_is_the_merge_negated_at_its_rank() -> None:
    live = build_merge("concat", [_task(1), _task(2)])  # rank 8
    fix = correction(None, live, max_rank=8)
    assert fix.exact and fix.rank == 8 and fix.served_rank == 8 and fix.relative_error == 0.0
    _assert_served(None, live, fix.adapter)


def test_a_task_under_the_concat_that_holds_it_needs_only_the_other_tasks_rank() -> None:
    first, second, third = _task(1), _task(2), _task(3)
    live = build_merge("concat", [first, second, third])  # rank 12
    fix = correction(second, live, max_rank=8)  # stacked: 4 + 12; really: −(first + third) = 8
    assert fix.exact and fix.rank == 8
    _assert_served(second, live, fix.adapter)


def test_the_model_as_learned_of_the_newest_task_is_the_live_merge_itself() -> None:
    tasks = [_task(1), _task(2)]
    live = build_merge("concat", tasks)
    fix = correction(build_merge("concat", tasks), live, max_rank=8)
    assert fix.adapter is None and fix.rank == 0 and fix.exact


def test_sum_merges_correct_exactly_too() -> None:
    g = torch.Generator().manual_seed(0)
    A = {name: torch.randn(4, d_in, generator=g) for name, (_, d_in) in SHAPES.items()}
    tasks = []
    for row in (0, 1):  # disjoint masks over one shared A (LoRAF)
        modules, masks = {}, {}
        for name, (d_out, _) in SHAPES.items():
            mask = torch.zeros(d_out, 4, dtype=torch.bool)
            mask[row::2] = True
            modules[name] = LoraModule(A=A[name], B=torch.randn(d_out, 4, generator=g) * mask, scale=2.0)
            masks[name] = mask
        tasks.append(LoraAdapter(modules, masks))
    live = build_merge("sum", tasks)
    for target in (None, tasks[0], tasks[1]):
        fix = correction(target, live, max_rank=8)
        assert fix.exact and fix.rank <= 8
        _assert_served(target, live, fix.adapter)


def test_a_correction_above_max_rank_is_truncated_and_its_error_is_the_reference_one() -> None:
    live = build_merge("concat", [_task(s) for s in range(4)])  # rank 16
    fix = correction(None, live, max_rank=8)
    assert not fix.exact and fix.rank == 16 and fix.served_rank == 8
    want, served = _delta(None), _delta(fix.adapter)
    have = _live_delta(live)
    residual = sum(float((have[n] + served[n] - want[n]).norm() ** 2) for n in SHAPES) ** 0.5
    norm = sum(float(have[n].norm() ** 2) for n in SHAPES) ** 0.5
    assert 0 < fix.relative_error < 1
    assert fix.relative_error == pytest.approx(residual / norm, rel=1e-4)
    # Eckart–Young: nothing of rank 8 does better than the SVD; the first 8 directions of the
    # merge (its first two tasks) are a rank-8 candidate and must not beat it.
    naive = sum(
        float(_delta(build_merge("concat", [_task(s) for s in (2, 3)]))[n].norm() ** 2) for n in SHAPES
    )
    assert fix.relative_error <= naive**0.5 / norm + 1e-9


def test_dense_merges_correct_exactly_when_the_rank_fits_and_report_the_error_when_not() -> None:
    g = torch.Generator().manual_seed(5)
    dense = DenseDelta({name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()})
    full = correction(None, dense, max_rank=16)  # min(d_out, d_in) = 16 for both modules
    assert full.exact
    _assert_served(None, dense, full.adapter)
    task = _task(7)
    low = correction(task, dense, max_rank=4)
    assert not low.exact and 0 < low.relative_error < 1
    want, have, served = _delta(task), _live_delta(dense), _delta(low.adapter)
    residual = sum(float((have[n] + served[n] - want[n]).norm() ** 2) for n in SHAPES) ** 0.5
    norm = sum(float((want[n] - have[n]).norm() ** 2) for n in SHAPES) ** 0.5
    assert low.relative_error == pytest.approx(residual / norm, rel=1e-4)


def test_the_correction_saves_in_peft_layout_and_loads_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    live = build_merge("concat", [_task(1), _task(2)])
    fix = correction(_task(3), live, max_rank=16)
    assert fix.adapter is not None
    fix.adapter.save_peft(tmp_path, base_model="tiny")
    again = LoraAdapter.load_peft(tmp_path)
    _assert_served(_task(3), live, again)


def test_a_large_dense_correction_takes_the_randomized_path_and_still_reports_its_true_error() -> None:
    g = torch.Generator().manual_seed(9)
    name, (d_out, d_in) = "layers.0.big", (200, 120)  # 2 · (8 + 16) < 120: the randomized SVD
    # A decaying spectrum, as merged ΔWs have: rank-6 signal plus a small full-rank rest.
    signal = torch.randn(d_out, 6, generator=g) @ torch.randn(6, d_in, generator=g)
    noise = 0.05 * torch.randn(d_out, d_in, generator=g)
    for dense, exact in ((signal, True), (signal + noise, False)):
        fix = correction(None, DenseDelta({name: dense}), max_rank=8)
        assert fix.exact is exact
        assert fix.rank == (6 if exact else None)  # None: above the 8 served, not computed
        assert fix.adapter is not None
        served = reconstruct(fix.adapter, {name: (d_out, d_in)})[name]
        C = -dense.double()
        residual = float((C - served).norm() / C.norm())
        assert fix.relative_error == pytest.approx(residual, abs=1e-6)
        optimum = float((torch.linalg.svdvals(C)[8:] ** 2).sum().sqrt() / C.norm())
        assert residual <= optimum * 1.05 + 1e-6, "two power iterations get within 5 % of Eckart–Young"
