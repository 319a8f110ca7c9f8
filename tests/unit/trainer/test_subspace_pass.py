"""inflora's subspace pass, made cheap: one moment and one growth per distinct module input, the
token-rows form below d_in tokens, the complement form for a large basis — each checked against
the plain per-module computation (every module's own covariance, the dense residual's eigh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.subspace import Subspace
from trainer.activations import InputMoment, input_moments
from trainer.config import Hyperparameters, resolve_method
from trainer.loop import forward_batches, load_base, tokenize
from trainer.methods import parametrizations as parametrizations_module
from trainer.methods.registry import PARAMETRIZATIONS, LoraParams
from trainer.methods.subspace_algebra import (
    COMPLEMENT_FROM,
    grow_basis,
    grow_basis_from_rows,
    leading_free_directions,
)
from trainer.subspace_growth import grow_subspace, target_names
from trainer.suite.tasks import get_task

ENERGY = 0.95


def reference_growth(U: torch.Tensor | None, X: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM's step written out densely: eigh of (I − UUᵀ) XᵀX (I − UUᵀ), leading directions
    until span holds ``energy`` of tr(XᵀX)."""
    X = X.double()
    d = X.shape[1]
    U = torch.zeros(d, 0, dtype=torch.float64) if U is None else U.double()
    C = X.T @ X
    needed = energy * float(torch.trace(C)) - float(torch.trace(U.T @ C @ U))
    if needed <= 0:
        return U
    P = torch.eye(d, dtype=torch.float64) - U @ U.T
    values, vectors = torch.linalg.eigh(P @ C @ P)
    values, vectors = values.flip(0), vectors.flip(1)
    count = int((values.cumsum(0) < needed).sum()) + 1
    return torch.cat([U, vectors[:, :count]], dim=1)


def same_span(U: torch.Tensor, V: torch.Tensor, atol: float = 1e-4) -> bool:
    U, V = U.double(), V.double()
    return U.shape == V.shape and torch.allclose(U @ U.T, V @ V.T, atol=atol)


def inputs(seed: int, n: int, d: int, rank: int) -> torch.Tensor:
    """(n, d) rows near a ``rank``-dimensional subspace, with a decaying spectrum (no ties)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    weights = torch.linspace(3.0, 0.3, rank)
    return (torch.randn(n, rank, generator=g) * weights) @ basis + 0.01 * torch.randn(n, d, generator=g)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("k", [0, 4, 40])  # none, below and above d / COMPLEMENT_FROM
def test_rows_covariance_and_complement_forms_give_the_dense_reference(k: int) -> None:
    d = 64
    X = inputs(seed=k, n=40, d=d, rank=12)  # n < d: the rows form applies
    U = orthonormal(d, k, seed=1) if k else None
    expected = reference_growth(U, X, ENERGY)
    from_rows = grow_basis_from_rows(U, X, ENERGY)
    from_covariance = grow_basis(U, X.T @ X, ENERGY)
    assert expected.shape[1] > (k or 0)  # the task adds directions
    assert same_span(from_rows, expected)
    assert same_span(from_covariance, expected)
    for grown in (from_rows, from_covariance):
        assert torch.allclose(grown.T @ grown, torch.eye(grown.shape[1]), atol=1e-5)
        if U is not None:
            assert torch.equal(grown[:, :k], U)  # the earlier columns are kept as they are
    assert (k * COMPLEMENT_FROM >= d) == (k == 40)


def test_a_moment_keeps_rows_below_d_in_tokens_and_folds_them_into_the_covariance_after() -> None:
    X = torch.randn(30, 8)
    moment = InputMoment(d_in=8)
    moment.add(X[:3])
    moment.add(X[3:6])
    assert moment.finish().rows is not None and moment.tokens == 6
    assert torch.allclose(moment.covariance_matrix(), (X[:6].T @ X[:6]).double(), atol=1e-5)
    moment.add(X[6:20])  # 20 ≥ d_in tokens: one covariance from here on
    moment.add(X[20:])
    assert moment.rows is None and moment.covariance is not None
    assert torch.allclose(moment.covariance_matrix(), (X.T @ X).double(), atol=1e-4)


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_base(base_model_dir)


def test_modules_reading_one_input_share_one_moment(base) -> None:
    model, tokenizer = base
    names = target_names(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    examples, _ = get_task("topic").split(seed=0, n_train=8, n_test=1)
    batches = forward_batches(tokenizer, tokenize(tokenizer, examples, 64), torch.device("cpu"))
    moments = input_moments(model, batches, names)
    layer = "model.layers.1"
    q, k, v = (moments[f"{layer}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
    gate, up = moments[f"{layer}.mlp.gate_proj"], moments[f"{layer}.mlp.up_proj"]
    assert q is k is v and gate is up
    assert len({id(m) for m in moments.values()}) == 4 * model.config.num_hidden_layers


@pytest.mark.parametrize("n_train", [6, 150])  # fewer tokens than d_in (rows), and more (covariance)
def test_the_shared_pass_gives_every_module_the_basis_of_its_own_covariance(base, n_train: int) -> None:
    """The cheap pass against the plain one on the embedded model: each module's own inputs
    captured by a hook, its own dense covariance, the dense GPM step; some modules start from a
    basis large enough for the complement form, others from an empty one."""
    model, tokenizer = base
    hp = Hyperparameters()
    names = target_names(model, hp.target_modules)
    examples, _ = get_task("topic").split(seed=0, n_train=n_train, n_test=1)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    batches = forward_batches(tokenizer, tokenize(tokenizer, examples, hp.max_seq_len), torch.device("cpu"))
    for input_ids, mask in batches:
        handles = [
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name, mask=mask: captured[name].append(args[0][mask.bool()].detach())
            )
            for name in names
        ]
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
    previous = {
        name: orthonormal(
            model.get_submodule(name).in_features, model.get_submodule(name).in_features // 2, i
        )
        for i, name in enumerate(names)
        if i % 2
    }
    served = {name: torch.zeros_like(model.get_submodule(name).weight) for name in names}
    grown = grow_subspace(
        model, tokenizer, examples, served, Subspace(previous, ENERGY), ENERGY, hp.max_seq_len
    )
    tokens = sum(int(mask.sum()) for _, mask in batches)
    assert (tokens < 256) == (n_train == 6)  # hidden size 256: both forms are exercised
    for name in names:
        X = torch.cat(captured[name])  # (tokens, d_in)
        assert X.shape[0] == tokens
        expected = reference_growth(previous.get(name), X, ENERGY)
        assert same_span(grown.bases[name], expected), name


def test_inflora_orients_modules_that_share_an_input_with_one_eigendecomposition(monkeypatch) -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return leading_free_directions(*args, **kwargs)

    monkeypatch.setattr(parametrizations_module, "leading_free_directions", counting)
    d, r = 32, 4
    shared, own = inputs(0, 100, d, 10), inputs(1, 100, d, 10)
    C_shared, C_own = (shared.T @ shared).double(), (own.T @ own).double()
    U = orthonormal(d, 8, seed=2)
    names = ["l.self_attn.k_proj", "l.self_attn.q_proj", "l.self_attn.v_proj", "l.self_attn.o_proj"]
    covariances = {**dict.fromkeys(names[:3], C_shared), names[3]: C_own}
    subspace = Subspace(dict.fromkeys(names, U), ENERGY)
    hp = Hyperparameters(r=r, lora_alpha=2 * r)
    inflora = PARAMETRIZATIONS["inflora"](hp, resolve_method("inflora"), [], subspace)
    layers = {
        n: LoraParams(A=nn.Parameter(torch.empty(r, d)), B=nn.Parameter(torch.empty(6, r)), scale=2.0)
        for n in names
    }
    inflora.setup(layers)
    norms = {n: p.A.norm(dim=1, keepdim=True).clone() for n, p in layers.items()}
    inflora.orient(layers, covariances)
    assert len(calls) == 2  # one for q/k/v, one for o
    for name in names:
        rows, _ = leading_free_directions(covariances[name], U, r)
        torch.testing.assert_close(layers[name].A.detach(), rows * norms[name])
