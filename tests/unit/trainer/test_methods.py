"""The methods' math against plain reference computations on small tensors (no model needed)."""

from __future__ import annotations

import math
import subprocess
import sys
import typing

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from adapters_store.lora import LoraAdapter, LoraModule
from trainer.config import (
    PRESETS,
    Hyperparameters,
    MethodSpec,
    ParametrizationName,
    RegularizerName,
    UnknownMethodError,
    resolve_method,
)
from trainer.methods.parametrizations import (
    CapacityError,
    feasible_topk_mask,
    global_topk_masks,
    kaiming_uniform,
    module_seed,
)
from trainer.methods.registry import PARAMETRIZATIONS, REGULARIZERS, LoraParams
from trainer.methods.regularizers import l1_of_delta, orthogonal_loss, stability_loss

# ---------------------------------------------------------------------------------------------
# Config: presets and validation.

EXPECTED = {  # preset -> (parametrization, regularizers, merge, warm_start)
    "lori-d": ("lori", set(), "concat", False),
    "lori-s": ("lori", set(), "concat", False),
    "loraf": ("loraf", set(), "sum", False),
    "n-lora": ("lora", {"l1"}, "concat", False),
    "ps-lora": ("lora", {"stability"}, "magnitude", False),
    "o-lora": ("lora", {"orthogonal"}, "concat", False),
    "inc-lora": ("lora", set(), "concat", False),
    "seq-lora": ("lora", set(), "latest", True),
    "inflora": ("inflora", set(), "concat", False),
    "own-lora": ("own-lora", set(), "concat", False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_resolve(name: str) -> None:
    spec = resolve_method(name.upper())
    assert (spec.parametrization, set(spec.regularizers), spec.merge, spec.warm_start) == EXPECTED[name]
    assert spec.name == name


def test_preset_set_and_sparsity() -> None:
    assert set(PRESETS) == set(EXPECTED)
    hp = Hyperparameters(sparsity=0.8)
    assert resolve_method("lori-d").effective_sparsity(hp) == 0.0
    assert resolve_method("lori-s").effective_sparsity(hp) == 0.8


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(UnknownMethodError, match="lori-s"):
        resolve_method("ewc")


def test_registries_match_config_names() -> None:
    assert set(PARAMETRIZATIONS) == set(typing.get_args(ParametrizationName))
    assert set(REGULARIZERS) == set(typing.get_args(RegularizerName))


def test_lambda_overrides_add_and_remove_regularizers() -> None:
    olora = resolve_method("o-lora")
    assert olora.lambdas(Hyperparameters()) == {"orthogonal": 0.5}
    assert olora.lambdas(Hyperparameters(l1_lambda=0.01)) == {
        "orthogonal": 0.5,
        "l1": 0.01,
    }  # O-LoRA + N-LoRA
    assert olora.lambdas(Hyperparameters(orthogonal_lambda=0)) == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": 1024}, "r"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"mask_fraction": 0.0}, "mask_fraction"),
        ({"l1_lambda": -1.0}, "l1_lambda"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 8}, "rank"),  # unknown key
        ({"target_modules": ["q_proj", "model.layers.0"]}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Hyperparameters(**kwargs)
    assert field in {str(part) for error in info.value.errors() for part in error["loc"]}


def test_steps_and_epochs_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="steps"):
        Hyperparameters(steps=10, epochs=2)
    assert Hyperparameters(steps=10).steps == 10


def test_method_spec_rejects_unknown_names() -> None:
    with pytest.raises(ValidationError, match="parametrization"):
        MethodSpec(name="x", parametrization="dora", merge="concat")
    with pytest.raises(ValidationError, match="regularizers"):
        MethodSpec(name="x", parametrization="lora", regularizers={"ewc": 1.0}, merge="concat")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"parametrization": "lora", "sparsity": 0.5},
        {"parametrization": "lori", "warm_start": True},
        {"parametrization": "loraf", "stack_history": True},
        {"parametrization": "lora", "warm_start": True, "stack_history": True},
    ],
)
def test_method_spec_rejects_inconsistent_options(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        MethodSpec(name="x", merge="concat", **kwargs)


def test_config_imports_without_torch() -> None:
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Regularizers.


def test_l1_in_chunks_equals_dense_norm_and_gradient() -> None:
    torch.manual_seed(0)
    A = torch.randn(3, 7, requires_grad=True)
    B = torch.randn(10, 3, requires_grad=True)
    chunked = l1_of_delta(A, B, scale=2.5, chunk_rows=4)  # blocks of 4, 4, 2 rows
    chunked.backward()
    grads = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    dense = (2.5 * B @ A).abs().sum()
    dense.backward()
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(grads, (A.grad, B.grad))


def test_stability_matches_eq4_by_hand() -> None:
    # ΔW_t = 1 · B A = [[1, 0], [0, 2]] and S = ΔW_1 = [[1, 0], [0, -1]], α = 0.5.
    A, B = torch.eye(2), torch.diag(torch.tensor([1.0, 2.0]))
    S_A, S_B = torch.eye(2), torch.diag(torch.tensor([1.0, -1.0]))
    t = math.tanh
    by_hand = 1**2 * (1 - t(0.5) * t(0.5)) + 0 + 0 + 2**2 * (1 - t(1.0) * t(-0.5))
    loss = stability_loss(A, B, 1.0, S_A, S_B, alpha=0.5, chunk_rows=1)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # Without earlier tasks S = 0 and the loss is ‖ΔW_t‖²_F = 1 + 4.
    zero = stability_loss(A, B, 1.0, torch.zeros(1, 2), torch.zeros(2, 1), alpha=0.5)
    assert zero.item() == pytest.approx(5.0)


def test_stability_in_chunks_equals_dense_eq4_and_its_gradient() -> None:
    torch.manual_seed(1)
    A = torch.randn(3, 7, requires_grad=True)
    B = torch.randn(10, 3, requires_grad=True)
    S_A, S_B = torch.randn(4, 7), torch.randn(10, 4)
    chunked = stability_loss(A, B, 0.7, S_A, S_B, alpha=0.8, chunk_rows=4)  # blocks of 4, 4, 2 rows
    (3.0 * chunked).backward()  # the gradient is scaled like any other loss term's
    grads = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    delta, S = 0.7 * B @ A, S_B @ S_A
    dense = (delta.square() * (1 - torch.tanh(0.8 * delta) * torch.tanh(0.8 * S))).sum()
    (3.0 * dense).backward()
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(grads, (A.grad, B.grad))


def test_a_regularizer_evaluated_without_gradients_builds_no_graph() -> None:
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    value = l1_of_delta(A, B, scale=1.0, chunk_rows=4)
    assert not value.requires_grad
    assert value.item() == pytest.approx((B @ A).abs().sum().item(), rel=1e-6)


def _adapter(seed: int, rank: int = 2, d_out: int = 6, d_in: int = 5, scale: float = 2.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(
        A=torch.randn(rank, d_in, generator=g), B=torch.randn(d_out, rank, generator=g), scale=scale
    )
    return LoraAdapter(modules={"m": module})


def _layers(adapter: LoraAdapter) -> dict[str, LoraParams]:
    module = adapter.modules["m"]
    return {
        "m": LoraParams(
            A=nn.Parameter(module.A.clone()), B=nn.Parameter(module.B.clone()), scale=module.scale
        )
    }


def test_stability_regularizer_sums_history() -> None:
    history = [_adapter(1), _adapter(2, rank=3)]
    current = _adapter(3)
    hp = Hyperparameters(stability_alpha=0.7)
    S = sum(adapter.modules["m"].delta() for adapter in history)  # (6, 5)
    delta = current.modules["m"].delta()
    reference = (delta**2 * (1 - torch.tanh(0.7 * delta) * torch.tanh(0.7 * S))).sum()
    loss = REGULARIZERS["stability"](hp, history)(_layers(current))
    torch.testing.assert_close(loss, reference)


def test_stability_sign_term_is_active_at_lora_scale() -> None:
    """With α from rms(S) eq. 4 prefers a ΔW that agrees in sign with S; a fixed α = 100 is inert
    for entries of a realistic LoRA size (~5e-4) and scores both signs the same."""
    g = torch.Generator().manual_seed(0)
    earlier = LoraAdapter(
        {"m": LoraModule(torch.randn(4, 32, generator=g), 1e-4 * torch.randn(16, 4, generator=g), 1.0)}
    )
    S = earlier.modules["m"].delta()
    A, B = earlier.modules["m"].A, earlier.modules["m"].B  # ΔW = S: agrees in sign everywhere
    assert 1e-4 < float(S.abs().mean()) < 1e-3

    def loss(hp: Hyperparameters, sign: float) -> float:
        layers = {"m": LoraParams(A=nn.Parameter(A), B=nn.Parameter(sign * B), scale=1.0)}
        return REGULARIZERS["stability"](hp, [earlier])(layers).item()

    auto = Hyperparameters()
    assert auto.stability_alpha is None
    assert loss(auto, -1.0) > 3 * loss(auto, +1.0)  # flipping S's signs costs much more
    fixed = Hyperparameters(stability_alpha=100.0)
    assert loss(fixed, -1.0) == pytest.approx(loss(fixed, +1.0), rel=0.02)


def test_orthogonal_matches_direct_computation() -> None:
    history = [_adapter(1), _adapter(2, rank=3)]
    current = _adapter(3)
    A_t = current.modules["m"].A
    reference = sum(torch.linalg.matrix_norm(h.modules["m"].A @ A_t.T) ** 2 for h in history)
    loss = REGULARIZERS["orthogonal"](Hyperparameters(), history)(_layers(current))
    torch.testing.assert_close(loss, reference)
    previous = torch.cat([h.modules["m"].A for h in history])
    torch.testing.assert_close(orthogonal_loss(A_t, previous), reference)
    assert REGULARIZERS["orthogonal"](Hyperparameters(), [])(_layers(current)).item() == 0.0


def test_l1_regularizer_sums_modules() -> None:
    current = _adapter(3)
    loss = REGULARIZERS["l1"](Hyperparameters(), [])(_layers(current))
    torch.testing.assert_close(loss, current.modules["m"].delta().abs().sum())


# ---------------------------------------------------------------------------------------------
# Masks.


def test_global_topk_keeps_exactly_the_largest_entries_across_modules() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.randn(8, 4), "b": torch.randn(16, 4) * 3, "c": torch.randn(4, 4) * 0.1}
    masks = global_topk_masks(scores, keep_fraction=0.25)
    flat = torch.cat([scores[n].abs().flatten() for n in sorted(scores)])
    k = round(0.25 * flat.numel())
    threshold = flat.sort(descending=True).values[k - 1]  # the model-wise τ of LoRI eq. 2
    for name, score in scores.items():
        assert torch.equal(masks[name], score.abs() >= threshold)
    assert sum(int(m.sum()) for m in masks.values()) == k
    assert masks["b"].float().mean() > masks["c"].float().mean()  # one global threshold, not per module


def test_feasible_topk_stays_inside_omega() -> None:
    torch.manual_seed(0)
    update = torch.randn(6, 3)
    feasible = torch.rand(6, 3) > 0.4
    mask = feasible_topk_mask(update, feasible, k=4)
    assert int(mask.sum()) == 4 and not (mask & ~feasible).any()
    kept = update.abs()[mask]
    assert kept.min() >= update.abs()[feasible & ~mask].max()


def test_kaiming_uniform_is_seeded_and_bounded() -> None:
    a, b = kaiming_uniform((4, 25), seed=7), kaiming_uniform((4, 25), seed=7)
    assert torch.equal(a, b) and not torch.equal(a, kaiming_uniform((4, 25), seed=8))
    assert a.abs().max() <= 1 / 5
    assert module_seed(1, 0) != module_seed(0, 1)


# ---------------------------------------------------------------------------------------------
# Parametrizations driven by a hand-written loop on a toy regression (no language model).


def _fake_layers(shapes: dict[str, tuple[int, int]], rank: int, scale: float) -> dict[str, LoraParams]:
    return {
        name: LoraParams(
            A=nn.Parameter(torch.empty(rank, d_in)), B=nn.Parameter(torch.empty(d_out, rank)), scale=scale
        )
        for name, (d_out, d_in) in shapes.items()
    }


def _run(parametrization, layers, steps: int, seed: int, watch=None) -> None:
    """setup → calibration → masked training with AdamW (weight decay on, to stress the masks)."""
    g = torch.Generator().manual_seed(seed)
    targets = {name: torch.randn(p.B.shape[0], p.A.shape[1], generator=g) for name, p in layers.items()}
    parametrization.setup(layers)

    def optimizer():
        params = [t for p in layers.values() for t in (p.A, p.B) if t.requires_grad]
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)

    opt = optimizer()
    for step in range(parametrization.calibration_steps + steps):
        if step == parametrization.calibration_steps and step > 0:
            parametrization.calibrate(layers)
            opt = optimizer()
        loss = sum(((p.scale * p.B @ p.A - targets[n]) ** 2).mean() for n, p in layers.items())
        loss.backward()
        opt.step()
        opt.zero_grad()
        parametrization.after_step(layers)
        if watch is not None and step >= parametrization.calibration_steps:
            watch(layers)
    parametrization.close()


SHAPES = {"x.q_proj": (12, 10), "x.v_proj": (6, 10), "y.q_proj": (12, 8)}


def test_lori_s_masked_out_entries_never_change() -> None:
    hp = Hyperparameters(r=4, lora_alpha=8, sparsity=0.75, calibration_steps=3)
    method = resolve_method("lori-s")
    lori = PARAMETRIZATIONS["lori"](hp, method, [])
    layers = _fake_layers(SHAPES, 4, 2.0)
    seen_nonzero = []

    def watch(layers):
        for name, p in layers.items():
            assert (p.B.detach()[~lori.masks[name]] == 0).all(), f"{name}: an entry outside the mask moved"
            assert not p.A.requires_grad
        seen_nonzero.append(sum(int((p.B != 0).sum()) for p in layers.values()))

    _run(lori, layers, steps=10, seed=0, watch=watch)
    total = sum(d_out * 4 for d_out, _ in SHAPES.values())
    assert sum(int(m.sum()) for m in lori.masks.values()) == round(0.25 * total)
    assert seen_nonzero[-1] > 0  # the masked entries did train
    adapter = lori.export(layers)
    assert set(adapter.masks) == set(SHAPES)
    for index, name in enumerate(sorted(SHAPES)):  # A is regenerable from the recorded seed
        expected = kaiming_uniform((4, SHAPES[name][1]), module_seed(lori.metrics()["a_seed"], index))
        assert torch.equal(adapter.modules[name].A, expected)


def test_mask_hook_zeroes_gradients_outside_the_mask() -> None:
    hp = Hyperparameters(r=4, lora_alpha=8, sparsity=0.5, calibration_steps=1)
    lori = PARAMETRIZATIONS["lori"](hp, resolve_method("lori-s"), [])
    layers = _fake_layers(SHAPES, 4, 2.0)
    lori.setup(layers)
    for p in layers.values():  # stand-in for calibration training
        p.B.data.normal_()
    lori.calibrate(layers)
    sum((p.B @ p.A).sum() for p in layers.values()).backward()
    for name, p in layers.items():
        assert (p.B.grad[~lori.masks[name]] == 0).all() and (p.B.grad[lori.masks[name]] != 0).any()
    lori.close()


def test_lori_tasks_get_different_frozen_A() -> None:
    hp, method = Hyperparameters(r=4), resolve_method("lori-d")
    first = PARAMETRIZATIONS["lori"](hp, method, [])
    layers = _fake_layers(SHAPES, 4, 2.0)
    first.setup(layers)
    history = [first.export(layers)]
    second = PARAMETRIZATIONS["lori"](hp, method, history)
    layers = _fake_layers(SHAPES, 4, 2.0)
    second.setup(layers)
    assert not torch.equal(layers["x.q_proj"].A, history[0].modules["x.q_proj"].A)
    # Removing tasks can make the position-based seed repeat; the seed is bumped past used ones.
    clash = PARAMETRIZATIONS["lori"](hp, method, [second.export(layers)])  # same position as `second`
    clash.setup(_fake_layers(SHAPES, 4, 2.0))
    assert second.metrics()["a_seed"] == 1 and clash.metrics()["a_seed"] == 2


def test_loraf_masks_disjoint_and_union_grows() -> None:
    hp = Hyperparameters(r=4, lora_alpha=8, mask_fraction=0.2, calibration_steps=3)
    method = resolve_method("loraf")
    history: list[LoraAdapter] = []
    union = {name: torch.zeros(d_out, 4, dtype=torch.bool) for name, (d_out, _) in SHAPES.items()}
    for task in range(4):
        loraf = PARAMETRIZATIONS["loraf"](hp, method, history)
        layers = _fake_layers(SHAPES, 4, 2.0)
        owned_before = {name: mask.clone() for name, mask in union.items()}
        start_B = {}

        def watch(layers, loraf=loraf, start_B=start_B):
            for name, p in layers.items():
                outside = ~loraf.masks[name]
                start_B.setdefault(name, loraf.start[name].clone())
                assert torch.equal(p.B.detach()[outside], start_B[name][outside]), (
                    "earlier tasks' entries moved"
                )

        _run(loraf, layers, steps=6, seed=task, watch=watch)
        adapter = loraf.export(layers)
        for name, mask in adapter.masks.items():
            assert not (mask & owned_before[name]).any(), f"task {task} reuses a position in {name}"
            assert int(mask.sum()) == math.floor(0.2 * mask.numel())
            assert (adapter.modules[name].B[~mask] == 0).all()
            union[name] |= mask
            assert int(union[name].sum()) > int(owned_before[name].sum())
            if history:
                assert torch.equal(adapter.modules[name].A, history[0].modules[name].A)  # one shared A
        history.append(adapter)
    assert loraf.metrics()["positions_left"] == sum(int((~u).sum()) for u in union.values())


def test_loraf_capacity_error_says_what_is_left() -> None:
    hp = Hyperparameters(r=2, lora_alpha=4, mask_fraction=0.6, calibration_steps=1)
    method = resolve_method("loraf")
    first = PARAMETRIZATIONS["loraf"](hp, method, [])
    layers = _fake_layers({"m": (5, 3)}, 2, 2.0)
    _run(first, layers, steps=1, seed=0)
    second = PARAMETRIZATIONS["loraf"](hp, method, [first.export(layers)])
    with pytest.raises(CapacityError, match=r"has 4 free B positions of 10, the task needs 6"):
        second.setup(_fake_layers({"m": (5, 3)}, 2, 2.0))
    second.close()


def test_seq_lora_continues_from_previous_adapter() -> None:
    hp = Hyperparameters(r=4, lora_alpha=8)
    previous = LoraAdapter(
        modules={
            name: LoraModule(A=torch.randn(4, d_in), B=torch.randn(d_out, 4), scale=2.0)
            for name, (d_out, d_in) in SHAPES.items()
        }
    )
    seq = PARAMETRIZATIONS["lora"](hp, resolve_method("seq-lora"), [previous])
    layers = _fake_layers(SHAPES, 4, 2.0)
    seq.setup(layers)
    for name, p in layers.items():
        assert torch.equal(p.A, previous.modules[name].A) and torch.equal(p.B, previous.modules[name].B)
    inc = PARAMETRIZATIONS["lora"](hp, resolve_method("inc-lora"), [previous])
    inc.setup(layers)
    assert all((p.B == 0).all() and p.A.requires_grad for p in layers.values())
