"""inflora's protected input subspace: the GPM growth rule, the projection of A, the measurement
on a model, the store round trip and the capacity refusal, each against a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.store import AdapterStore
from adapters_store.subspace import Subspace
from tests.support.models import tiny_llama
from trainer.activations import input_covariances
from trainer.config import Hyperparameters, resolve_method
from trainer.contract.admission import AdmissionError, admit
from trainer.methods.parametrizations import CapacityError
from trainer.methods.registry import PARAMETRIZATIONS, LoraParams
from trainer.methods.subspace_algebra import grow_basis, leading_free_directions, project_rows

D_IN = 24
ENERGY = 0.99


def low_rank_inputs(seed: int, n: int = 200, rank: int = 5, noise: float = 0.01) -> torch.Tensor:
    """(n, D_IN) inputs concentrated near a random ``rank``-dimensional subspace, like activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, D_IN, generator=g)
    return torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, D_IN, generator=g)


def held_energy(U: torch.Tensor, X: torch.Tensor) -> float:
    """‖U Uᵀ xᵢ‖² summed over rows, as a share of Σ‖xᵢ‖²."""
    return float((X @ U).square().sum() / X.square().sum())


def test_basis_is_orthonormal_and_holds_the_energy_of_every_task() -> None:
    X1, X2 = low_rank_inputs(1), low_rank_inputs(2)
    U1 = grow_basis(None, X1.T @ X1, ENERGY)
    U2 = grow_basis(U1, X2.T @ X2, ENERGY)
    for U in (U1, U2):
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)
    assert held_energy(U1, X1) >= ENERGY
    assert held_energy(U2, X1) >= ENERGY and held_energy(U2, X2) >= ENERGY
    assert 5 <= U1.shape[1] < U2.shape[1] <= 10  # two 5-dim signals, noise left out
    assert torch.allclose(U2[:, : U1.shape[1]], U1, atol=1e-5)  # grown, never rotated away


def test_a_task_already_inside_the_basis_adds_no_direction() -> None:
    X = low_rank_inputs(3)
    U = grow_basis(None, X.T @ X, ENERGY)
    assert grow_basis(U, 2.0 * X.T @ X, ENERGY).shape == U.shape


def test_projected_rows_annihilate_the_protected_inputs() -> None:
    """‖A_p Xᵀ‖_F ≤ ‖A_p‖₂ · √(1 − ε) · ‖X‖_F: what is left of X outside span(U) bounds it."""
    X = low_rank_inputs(4)
    U = grow_basis(None, X.T @ X, ENERGY)
    A = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(5))
    A_p = project_rows(A, U)
    assert torch.allclose(A_p.norm(dim=1), A.norm(dim=1), rtol=1e-5)  # scale kept
    bound = torch.linalg.matrix_norm(A_p, ord=2) * (1 - ENERGY) ** 0.5 * X.norm()
    assert (A_p @ X.T).norm() <= bound
    assert (A_p @ X.T).norm() < 0.05 * (A @ X.T).norm()  # and far below the unprojected A's


def test_covariances_match_captured_inputs_in_one_pass_or_many() -> None:
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ids = torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding must not count
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str, x: torch.Tensor) -> None:  # a pre-hook that returns None keeps the input
        captured[name] = x[mask.bool()].detach().clone()

    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: capture(n, args[0]))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    one_pass = input_covariances(model, [(ids, mask)], names)
    per_module = input_covariances(model, [(ids, mask)], names, memory_bytes=1)  # a pass per module
    for name in names:
        expected = (captured[name].T @ captured[name]).double()
        assert captured[name].shape[0] == 3 * 7 - 2
        assert torch.allclose(one_pass[name], expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(per_module[name], expected, rtol=1e-5, atol=1e-6)


def test_inflora_projects_its_frozen_A_and_refuses_a_full_module() -> None:
    name = "model.layers.0.self_attn.q_proj"
    X = low_rank_inputs(6)
    subspace = Subspace(bases={name: grow_basis(None, X.T @ X, ENERGY)}, energy=ENERGY)
    method, hp = resolve_method("inflora"), Hyperparameters(r=4, lora_alpha=8)
    layers = {
        name: LoraParams(
            A=torch.nn.Parameter(torch.zeros(4, D_IN)), B=torch.nn.Parameter(torch.zeros(6, 4)), scale=2.0
        )
    }
    PARAMETRIZATIONS["inflora"](hp, method, [], subspace).setup(layers)
    A = layers[name].A.detach()
    assert not layers[name].A.requires_grad
    assert (A @ X.T).norm() <= torch.linalg.matrix_norm(A, ord=2) * (1 - ENERGY) ** 0.5 * X.norm()

    full = Subspace(bases={name: torch.linalg.qr(torch.randn(D_IN, D_IN - 3))[0]}, energy=ENERGY)
    with pytest.raises(CapacityError, match=r"3 free input directions of 24"):
        PARAMETRIZATIONS["inflora"](hp, method, [], full).setup(layers)


def adapter(seed: int, rank: int = 2) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            "model.layers.0.self_attn.q_proj": LoraModule(
                torch.randn(rank, D_IN, generator=g), torch.randn(6, rank, generator=g), 1.0
            )
        }
    )


def test_the_subspace_round_trips_with_its_merge_and_survives_removal(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, "fp")
    name = "model.layers.0.self_attn.q_proj"
    X1, X2 = low_rank_inputs(7), low_rank_inputs(8)
    first = Subspace({name: grow_basis(None, X1.T @ X1, ENERGY)}, ENERGY)
    second = Subspace({name: grow_basis(first.bases[name], X2.T @ X2, ENERGY)}, ENERGY)
    m1 = store.publish("one", adapter(0), {"method": "inflora"}, "concat", subspace=first).merge
    store.publish("two", adapter(1), {"method": "inflora"}, "concat", subspace=second)

    loaded = store.subspace()
    assert loaded is not None and loaded.energy == ENERGY
    U, V = loaded.bases[name], second.bases[name]
    assert torch.allclose(U @ U.T, V @ V.T, atol=5e-3)  # same span after fp16 storage
    assert store.live().meta["subspace"] == {"energy": ENERGY, "dims": second.dims(), "d_in": {name: D_IN}}

    store.remove_task("one")  # the directions of a removed task stay reserved
    assert store.subspace().dims() == second.dims()
    store.rollback(m1.id)
    assert store.subspace().dims() == first.dims()


def test_admission_refuses_an_inflora_task_that_does_not_fit(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, "fp")
    name = "model.layers.0.self_attn.q_proj"
    nearly_full = Subspace({name: torch.linalg.qr(torch.randn(D_IN, D_IN - 3))[0]}, ENERGY)
    store.publish("one", adapter(0), {"method": "inflora"}, "concat", subspace=nearly_full)
    method = resolve_method("inflora")
    admit(store, "two", method, Hyperparameters(r=3), max_lora_rank=64)
    with pytest.raises(AdmissionError) as refused:
        admit(store, "two", method, Hyperparameters(r=4), max_lora_rank=64)
    error = refused.value
    assert (error.reason, error.param) == ("capacity_exceeded", "hyperparameters.r")
    assert name in error.message and "3 of 24 input directions free" in error.message


def test_admin_stats_report_subspace_occupancy_per_module(tmp_path: Path) -> None:
    from adapters_store.stats_cache import stats_for_store
    from adapters_store.stats_plot import render_stats_png

    store = AdapterStore(tmp_path, "fp")
    name = "model.layers.0.self_attn.q_proj"
    X = low_rank_inputs(9)
    subspace = Subspace({name: grow_basis(None, X.T @ X, ENERGY)}, ENERGY)
    store.publish("one", adapter(0), {"method": "inflora"}, "concat", subspace=subspace)
    k = subspace.dims()[name]

    view = stats_for_store(store)
    assert view["subspace"]["modules"][name] == {"reserved": k, "d_in": D_IN, "occupancy": k / D_IN}
    assert view["subspace"]["free_min"] == D_IN - k and view["subspace"]["energy"] == ENERGY
    assert stats_for_store(store)["subspace"] == view["subspace"]  # from the cache too
    assert render_stats_png(view).startswith(b"\x89PNG")


def test_leading_free_directions_are_the_task_energy_outside_the_basis() -> None:
    X_old, X_new = low_rank_inputs(10), low_rank_inputs(11)
    U = grow_basis(None, X_old.T @ X_old, ENERGY)
    C = X_new.T @ X_new
    rows, held = leading_free_directions(C, U, 4)  # (4, D_IN)
    assert torch.allclose(rows @ rows.T, torch.eye(4), atol=1e-5)
    assert (rows @ U).abs().max() < 1e-5  # never inside the protected span
    P = torch.eye(D_IN) - U @ U.T
    reference = torch.linalg.eigvalsh(P @ C @ P).flip(0)[:4].sum() / torch.trace(C)
    assert held == pytest.approx(float(reference), rel=1e-4)  # the most energy 4 free directions can hold
    random_rows = project_rows(torch.randn(4, D_IN, generator=torch.Generator().manual_seed(3)), U)
    random_rows = torch.linalg.qr(random_rows.T)[0].T
    assert held > float(torch.trace(random_rows @ C @ random_rows.T) / torch.trace(C))

    one_token = torch.randn(1, D_IN, generator=torch.Generator().manual_seed(12))
    rows, _ = leading_free_directions(one_token.T @ one_token, U, 4)  # rank 1: completed to 4
    assert torch.allclose(rows @ rows.T, torch.eye(4), atol=1e-5) and (rows @ U).abs().max() < 1e-5


def test_each_merge_stores_only_the_directions_it_adds(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = AdapterStore(tmp_path, "fp")
    name = "model.layers.0.self_attn.q_proj"
    X1, X2 = low_rank_inputs(13), low_rank_inputs(14)
    start = Subspace({name: grow_basis(None, X1.T @ X1, ENERGY)}, ENERGY)
    store.publish("one", adapter(0), {"method": "inflora"}, "concat", subspace=start)
    first = store.subspace()
    grown = Subspace({name: grow_basis(first.bases[name], X2.T @ X2, ENERGY)}, ENERGY, grown_from=first)
    m2 = store.publish("two", adapter(1), {"method": "inflora"}, "concat", subspace=grown).merge
    m3 = store.remove_task("one")

    def stored_columns(merge_id: str) -> int:
        return load_file(str(tmp_path / "merges" / merge_id / "subspace.safetensors"))[name].shape[1]

    k1, k2 = first.dims()[name], grown.dims()[name]
    assert (stored_columns("m1"), stored_columns(m2.id), stored_columns(m3.id)) == (k1, k2 - k1, 0)
    loaded = store.subspace()
    assert loaded.dims() == {name: k2} and loaded.merge_id == m3.id
    U = loaded.bases[name]
    assert torch.allclose(U.T @ U, torch.eye(k2), atol=1e-5)
    V = grown.bases[name]
    assert torch.allclose(U @ U.T, V @ V.T, atol=5e-3)
    assert held_energy(U, X1) >= ENERGY - 1e-3 and held_energy(U, X2) >= ENERGY - 1e-3


def test_own_lora_gives_the_merge_its_update_off_the_protected_inputs_and_serves_it_whole(
    tmp_path: Path,
) -> None:
    """own-lora: the merge's part of a task acts on the protected inputs not at all and on every
    other input exactly as the task's own model; model=<task> serves the whole task."""
    name = "model.layers.0.self_attn.q_proj"
    X = low_rank_inputs(9)  # the earlier tasks' (and the base's) inputs
    U = grow_basis(None, X.T @ X, ENERGY)
    own = adapter(10, rank=3)
    part, kept = PARAMETRIZATIONS["own-lora"].merge_part(own, Subspace({name: U}, ENERGY))

    whole, merged = own.modules[name], part.modules[name]
    protected = U @ torch.randn(U.shape[1], 5, generator=torch.Generator().manual_seed(11))  # (D_IN, 5)
    free = torch.linalg.qr(torch.cat([U, torch.eye(D_IN)], dim=1))[0][:, U.shape[1] :]  # span(U)'s complement
    assert (merged.B @ merged.A @ protected).abs().max() < 1e-5
    assert torch.allclose(merged.B @ merged.A @ free, whole.B @ whole.A @ free, atol=1e-5)
    expected = (whole.B @ whole.A @ free).norm() / (whole.B @ whole.A).norm()  # ‖ΔW (I − UUᵀ)‖ / ‖ΔW‖
    assert kept == pytest.approx(float(expected), rel=1e-4) and 0 < kept < 1
    assert PARAMETRIZATIONS["own-lora"].merge_part(own, None) == (own, None)

    store = AdapterStore(tmp_path, "fp")
    published = store.publish("one", part, {"method": "own-lora"}, "concat", own_model=own)
    served = LoraAdapter.load_peft(published.task.serving_path).modules[name]
    stored = store.task_adapter("one").modules[name]
    assert torch.allclose(served.B @ served.A, whole.B @ whole.A, atol=1e-5)  # the task as trained
    assert torch.allclose(stored.B @ stored.A, merged.B @ merged.A, atol=1e-5)  # what merges are built from
    with pytest.raises(ValueError, match="either"):
        store.publish("two", part, {"method": "own-lora"}, "concat", as_learned=True, own_model=own)
