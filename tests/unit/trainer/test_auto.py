"""The rules that fill in hyper-parameters a user left out (trainer/auto.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer import auto
from trainer.config import Hyperparameters, resolve_method


def test_auto_is_the_default_and_the_word_auto_means_it() -> None:
    hp = Hyperparameters.model_validate({"steps": "auto", "learning_rate": "auto", "batch_size": "auto"})
    assert (hp.steps, hp.learning_rate, hp.batch_size, hp.epochs) == (None, None, None, None)
    assert Hyperparameters() == hp
    with pytest.raises(ValidationError):
        Hyperparameters.model_validate({"steps": "many"})


@pytest.mark.parametrize(
    ("n", "batch", "steps"),
    [(8, 8, 100), (40, 8, 100), (300, 8, 114), (2000, 8, 750), (100_000, 8, 1000), (3, 3, 100)],
)
def test_steps_and_batch_grow_with_the_task(n: int, batch: int, steps: int) -> None:
    resolved, chosen = auto.resolve(Hyperparameters(), resolve_method("inflora"), n)
    assert (resolved.batch_size, resolved.steps) == (batch, steps)
    assert chosen["steps"] == steps and chosen["batch_size"] == batch


def test_what_the_user_set_is_kept() -> None:
    hp = Hyperparameters(steps=7, learning_rate=0.1, batch_size=2)
    resolved, chosen = auto.resolve(hp, resolve_method("lori-d"), 40)
    assert (resolved.steps, resolved.learning_rate, resolved.batch_size) == (7, 0.1, 2) and chosen == {}
    by_epochs, chosen = auto.resolve(Hyperparameters(epochs=2, batch_size=4), resolve_method("lori-d"), 40)
    assert by_epochs.steps == 20 and chosen == {"learning_rate": auto.LEARNING_RATE["lori"]}


def test_learning_rate_follows_the_parametrization() -> None:
    rate = {name: auto.resolve(Hyperparameters(), resolve_method(name), 40)[0].learning_rate for name in
            ("inc-lora", "lori-d", "lori-s", "loraf", "inflora")}  # fmt: skip
    assert rate["inc-lora"] == auto.LEARNING_RATE["lora"] < rate["lori-d"] == rate["inflora"]
    assert rate["lori-s"] == pytest.approx(10 * rate["lori-d"])  # 10 % of B trained: a 10× rate
    assert rate["loraf"] == pytest.approx(auto.LEARNING_RATE["loraf"] / 0.1)  # mask_fraction 0.1
    half = auto.resolve(Hyperparameters(mask_fraction=0.5), resolve_method("loraf"), 40)[0]
    assert half.learning_rate == pytest.approx(auto.LEARNING_RATE["loraf"] / 0.5)
    sparse = auto.resolve(Hyperparameters(sparsity=0.99), resolve_method("lori-s"), 40)[0]
    assert sparse.learning_rate == auto.MAX_LEARNING_RATE


@pytest.mark.parametrize(("n", "held"), [(10, 0), (49, 0), (50, 5), (90, 9), (1000, 100)])
def test_held_out_slice(n: int, held: int) -> None:
    assert auto.held_out_count(n, 0.1) == held
    assert auto.held_out_count(n, 0.0) == 0


def test_auto_training_goes_on_while_the_loss_is_high_up_to_twice_the_plan() -> None:
    high, low = [1.0] * 100, [1.0] * 90 + [0.01] * 10
    assert auto.keep_going(high, planned=100) and not auto.keep_going(low, planned=100)
    assert not auto.keep_going([1.0] * 200, planned=100)  # at most EXTEND_FACTOR × the plan
    assert not auto.keep_going([1.0] * auto.MAX_STEPS, planned=900)  # and never past MAX_STEPS
