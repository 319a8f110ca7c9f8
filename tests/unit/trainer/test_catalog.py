"""The method catalogue: every name, knob, capacity check and ledger note comes from one registration."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.merges import MERGES
from trainer import auto
from trainer.config import (
    PRESETS,
    Hyperparameters,
    MergeName,
    ParametrizationName,
    RegularizerName,
    resolve_method,
)
from trainer.methods import catalog
from trainer.methods.capacity import loraf_mask_size
from trainer.methods.registry import PARAMETRIZATIONS, REGULARIZERS

REPO = Path(__file__).resolve().parents[3]


def test_names_tables_and_literals_are_the_catalogues() -> None:
    assert typing.get_args(ParametrizationName) == catalog.names("parametrization")
    assert typing.get_args(RegularizerName) == catalog.names("regularizer")
    assert typing.get_args(MergeName) == catalog.names("merge")
    assert tuple(PARAMETRIZATIONS) == catalog.names("parametrization")
    assert tuple(REGULARIZERS) == catalog.names("regularizer")
    assert set(catalog.names("merge")) == set(MERGES), "every merge the store implements is catalogued"
    assert list(PRESETS) == [p.name for p in catalog.presets()]
    assert set(auto.LEARNING_RATE) == set(catalog.names("parametrization"))


@pytest.mark.parametrize("kind", ["parametrization", "regularizer"])
def test_every_implementation_resolves_to_a_class(kind: catalog.Kind) -> None:
    table = PARAMETRIZATIONS if kind == "parametrization" else REGULARIZERS
    for name in catalog.names(kind):
        assert isinstance(table[name], type), name
    with pytest.raises(KeyError):
        table["no-such-part"]


def test_hyperparameters_carry_each_knobs_default_bounds_and_description() -> None:
    fields = Hyperparameters.model_fields
    for knob in catalog.knobs():
        assert fields[knob.name].default == knob.default
        assert fields[knob.name].description == knob.description
    hp = Hyperparameters()
    assert hp.mask_fraction == 0.1 and hp.subspace_init == "inputs"
    with pytest.raises(ValidationError) as info:
        Hyperparameters(calibration_steps=0)  # ge=1 from the knob
    assert info.value.errors()[0]["loc"] == ("calibration_steps",)


def test_mypy_types_of_the_builtin_knobs_name_exactly_the_catalogues_knobs() -> None:
    """trainer/config.py declares the built-in knobs' types for mypy; it must not drift."""
    tree = ast.parse((REPO / "trainer" / "config.py").read_text())
    stub = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_BuiltinKnobs")
    declared = {
        n.target.id for n in stub.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    assert declared == {k.name for k in catalog.knobs()}


def test_lambda_overrides_are_each_regularizers_knob() -> None:
    assert Hyperparameters(stability_lambda=0.2).regularizer_overrides() == {
        "l1": None,
        "stability": 0.2,
        "orthogonal": None,
    }


def test_preset_consistency_is_derived_from_the_parts() -> None:
    with pytest.raises(ValidationError, match="sparsity is a lori / inflora setting"):
        resolve_method("lori-s").model_validate(
            {**resolve_method("lori-s").model_dump(), "parametrization": "lora", "sparsity": 0.5}
        )
    with pytest.raises(ValidationError, match="needs the lora parametrization"):
        resolve_method("lori-s").model_validate({**resolve_method("lori-s").model_dump(), "warm_start": True})
    with pytest.raises(ValidationError, match="loraf include them"):
        resolve_method("loraf").model_validate(
            {**resolve_method("loraf").model_dump(), "stack_history": True}
        )


def test_registering_after_the_config_is_built_is_refused_with_the_way_to_do_it() -> None:
    part = catalog.Part(
        "regularizer",
        "late",
        "too late",
        knobs=(catalog.Knob("late_lambda", float, 0.0, "λ"),),
        implementation="x:y",
        lambda_knob="late_lambda",
    )
    with pytest.raises(RuntimeError, match="LAMINA_PLUGINS"):
        catalog.register(part)
    assert "late" not in catalog.names("regularizer")


def test_a_part_must_say_what_it_needs() -> None:
    with pytest.raises(ValueError, match="lambda_knob"):
        catalog.Part("regularizer", "r", "no λ knob", implementation="x:y")
    with pytest.raises(ValueError, match="implementation"):
        catalog.Part("parametrization", "p", "no implementation", auto_learning_rate=1e-3)


def test_loraf_mask_size_is_at_least_one_position() -> None:
    assert loraf_mask_size(0.1, 8, 4) == 3  # ⌊3.2⌋
    assert loraf_mask_size(0.01, 8, 4) == 1  # ⌊0.32⌋ = 0, but every task owns a position
    assert loraf_mask_size(1.0, 8, 4) == 32


def _adapter(rank: int) -> LoraAdapter:
    return LoraAdapter({"m": LoraModule(A=torch.zeros(rank, 4), B=torch.zeros(6, rank), scale=1.0)})


def test_ledger_notes_come_from_the_methods_parts() -> None:
    grown = Hyperparameters(r=8, lora_alpha=8)
    assert catalog.ledger_notes("loraf", "sum", [], [_adapter(4)], grown) == [
        {"op": "grow", "rank_from": 4, "rank_to": 8}
    ]
    assert catalog.ledger_notes("loraf", "sum", [], [_adapter(8)], grown) == []
    assert catalog.ledger_notes("loraf", "sum", [], [], grown) == []  # the first task grows nothing
    assert catalog.ledger_notes("lora", "concat", ["l1"], [_adapter(4)], grown) == []


PLUGIN_CHECK = """
import sys
from trainer.config import Hyperparameters, resolve_method

hp = Hyperparameters(toy_ridge_lambda=0.5)
method = resolve_method("toy-ridge")
assert method.lambdas(Hyperparameters()) == {"toy-ridge": 1e-3}, method.lambdas(Hyperparameters())
assert method.lambdas(hp) == {"toy-ridge": 0.5}
assert resolve_method("inflora").lambdas(hp) == {"toy-ridge": 0.5}  # a knob adds its part to any method
assert "torch" not in sys.modules, "the plugin and the catalogue import no torch"
from trainer.methods.registry import REGULARIZERS
from tests.plugins.toy_method import Ridge
assert REGULARIZERS["toy-ridge"] is Ridge
from bench.continual.config import ALL_METHODS
assert "toy-ridge" in ALL_METHODS
try:
    Hyperparameters(toy_ridge_lambda=-1)
except ValueError as error:
    assert "toy_ridge_lambda" in str(error)
else:
    raise AssertionError("the knob's bound ge=0 was not applied")
"""


def _python(code: str, plugins: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAMINA_PLUGINS": plugins}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_a_plugin_method_is_one_module_named_by_lamina_plugins() -> None:
    done = _python(PLUGIN_CHECK, "tests.plugins.toy_method")
    assert done.returncode == 0, done.stderr


def test_a_plugin_that_cannot_be_imported_is_named() -> None:
    done = _python("import trainer.config", "tests.plugins.no_such_module")
    assert done.returncode != 0
    assert "LAMINA_PLUGINS names 'tests.plugins.no_such_module'" in done.stderr


def test_a_plugin_knob_cannot_replace_a_shared_hyperparameter() -> None:
    done = _python("import trainer.config", "tests.plugins.clashing_knob")
    assert done.returncode != 0
    assert "knobs ['r'] would replace hyper-parameters every method shares" in done.stderr
