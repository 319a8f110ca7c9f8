"""What a training step must not spend work on: LoRI's frozen A (no gradient, no optimizer
state, ever) and PS-LoRA's tanh(α S), built once per task rather than once per step."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from adapters_store.lora import LoraAdapter, LoraModule
from tests.support.models import tiny_llama
from trainer.config import Hyperparameters, resolve_method
from trainer.loop import adapter_session, train_step
from trainer.methods import regularizers as regularizers_module
from trainer.methods.registry import REGULARIZERS, LoraParams


def causal_loss(peft_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return peft_model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("preset", ["lori-d", "lori-s"])
def test_lori_A_never_gets_a_gradient_or_optimizer_state(preset: str) -> None:
    model = tiny_llama()
    hp = Hyperparameters(
        r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), calibration_steps=1, learning_rate=1e-2
    )
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with adapter_session(model, resolve_method(preset), hp, []) as session:
        A = [p.A for p in session.layers.values()]
        B = [p.B for p in session.layers.values()]
        assert A and not any(a.requires_grad for a in A)  # frozen before the first step
        frozen = [a.detach().clone() for a in A]
        step = partial(train_step, session, partial(causal_loss, session.peft_model, ids))
        for _ in range(session.parametrization.calibration_steps):
            step()
        if session.parametrization.calibration_steps:
            session.start_main_phase()
        step()
        optimized = {id(t) for group in session.optimizer.param_groups for t in group["params"]}
        assert optimized == {id(b) for b in B}  # B only
        assert all(id(a) not in {id(t) for t in session.optimizer.state} for a in A)
        assert all(a.grad is None for a in A)
        assert all(torch.equal(a, f) for a, f in zip(A, frozen, strict=True))
        assert session.optimizer.state  # B did get its moments


def _adapter(seed: int, d_out: int = 12, d_in: int = 10, rank: int = 3) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {"m": LoraModule(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), 0.5)}
    )


def test_stability_builds_tanh_of_the_earlier_sum_once_per_task(monkeypatch) -> None:
    built = []
    original = regularizers_module.sign_weights

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(regularizers_module, "sign_weights", counting)
    history = [_adapter(1), _adapter(2)]
    current = _adapter(3).modules["m"]
    layers = {
        "m": LoraParams(A=nn.Parameter(current.A.clone()), B=nn.Parameter(current.B.clone()), scale=0.5)
    }
    stability = REGULARIZERS["stability"](Hyperparameters(stability_alpha=0.3), history)
    S = sum(a.modules["m"].delta() for a in history)
    for _ in range(3):
        delta = 0.5 * layers["m"].B @ layers["m"].A
        expected = (delta.square() * (1 - torch.tanh(0.3 * delta) * torch.tanh(0.3 * S))).sum()
        value = stability(layers)
        torch.testing.assert_close(value, expected)
        value.backward()
        with torch.no_grad():
            layers["m"].B.sub_(0.1 * layers["m"].B.grad)  # the step moves ΔW, S stays
        layers["m"].B.grad = layers["m"].A.grad = None
    assert len(built) == 1


def test_stability_without_earlier_tasks_is_the_squared_norm_and_its_gradient() -> None:
    current = _adapter(4).modules["m"]
    A, B = nn.Parameter(current.A.clone()), nn.Parameter(current.B.clone())
    value = REGULARIZERS["stability"](Hyperparameters(), [])({"m": LoraParams(A=A, B=B, scale=0.5)})
    value.backward()
    A2, B2 = current.A.clone().requires_grad_(), current.B.clone().requires_grad_()
    dense = (0.5 * B2 @ A2).square().sum()
    dense.backward()
    torch.testing.assert_close(value, dense)
    torch.testing.assert_close((A.grad, B.grad), (A2.grad, B2.grad))
