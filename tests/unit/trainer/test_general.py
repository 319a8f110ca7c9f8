"""The general-ability set: intervals, the coarsened KL, and scoring against the embedded base."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.chat import encode_prompt
from trainer.loop import load_base
from trainer.suite import general
from trainer.suite.general import (
    GeneralSet,
    build_general_set,
    load_or_build,
    mean_interval,
    score_general,
    topk_kl,
    wilson,
)
from trainer.suite.probe import MAX_NEW_TOKENS, first_word

N_SAMPLED = 16
MAX_QUESTIONS = 40  # of the ~600 candidates: enough for the plumbing, fast on two cores


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_base(base_model_dir)


@pytest.fixture(scope="module")
def gset(base) -> GeneralSet:
    model, tokenizer = base
    return build_general_set(
        model, tokenizer, n_sampled=N_SAMPLED, seed=0, fingerprint="tiny", max_questions=MAX_QUESTIONS
    )


@contextmanager
def perturbed(model: PreTrainedModel, scale: float = 0.5) -> Iterator[None]:
    """Noise on the LM head (seeded), the original weights put back afterwards."""
    weight = model.get_output_embeddings().weight
    saved = weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def first_difference(ids: list[int], target: list[int]) -> int:
    """The first position of ``target`` that ``ids`` does not hold (ending early counts)."""
    return next((i for i in range(len(target)) if i >= len(ids) or ids[i] != target[i]), len(target))


# ---------------------------------------------------------------------------------------------
# Intervals


def test_wilson_matches_hand_computed_bounds() -> None:
    interval = wilson(95, 100)
    assert (interval.value, interval.n) == (0.95, 100)
    assert interval.low == pytest.approx(0.88825, abs=1e-4)
    assert interval.high == pytest.approx(0.97846, abs=1e-4)
    none = wilson(0, 10)
    assert (none.value, none.low) == (0.0, 0.0)
    assert none.high == pytest.approx(0.27754, abs=1e-4)


def test_wilson_edge_cases() -> None:
    every = wilson(100, 100)
    assert (every.value, every.high) == (1.0, 1.0)
    assert every.low == pytest.approx(0.96300, abs=1e-4)
    empty = wilson(0, 0)
    assert math.isnan(empty.value) and (empty.low, empty.high, empty.n) == (0.0, 1.0, 0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mean_interval_matches_hand_computed_bounds() -> None:
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])  # sd sqrt(5/3), se sd / 2
    assert interval.value == pytest.approx(2.5)
    assert interval.low == pytest.approx(2.5 - 1.96 * math.sqrt(5 / 3) / 2)
    assert interval.high == pytest.approx(2.5 + 1.96 * math.sqrt(5 / 3) / 2)
    assert interval.n == 4
    assert mean_interval([0.5] * 7).to_dict() == {"value": 0.5, "low": 0.5, "high": 0.5, "n": 7}


def test_mean_interval_edge_cases() -> None:
    empty = mean_interval([])
    assert empty.n == 0 and math.isnan(empty.value) and math.isnan(empty.low)
    single = mean_interval([0.3])
    assert single.value == 0.3 and single.n == 1 and math.isnan(single.high)


# ---------------------------------------------------------------------------------------------
# The coarsened KL


def test_topk_kl_matches_a_hand_computed_kl_on_four_tokens() -> None:
    base = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    model = torch.full((4,), 0.25).log()
    values, ids = base.topk(2)  # buckets: token 0, token 1, rest (0.2 base, 0.5 model)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert float(topk_kl(values, ids, model)) == pytest.approx(expected, abs=1e-6)
    rest = torch.tensor(0.2).log()
    assert float(topk_kl(values, ids, model, rest)) == pytest.approx(expected, abs=1e-6)


def test_topk_kl_over_the_whole_vocabulary_is_the_full_kl() -> None:
    base = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    model = torch.tensor([0.4, 0.4, 0.1, 0.1]).log()
    values, ids = base.topk(4)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert float(topk_kl(values, ids, model, torch.tensor(-math.inf))) == pytest.approx(expected, abs=1e-6)


def test_topk_kl_is_zero_for_identical_distributions() -> None:
    logprobs = torch.log_softmax(torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    values, ids = logprobs.topk(8, dim=-1)
    kl = topk_kl(values, ids, logprobs)
    assert kl.shape == (3, 5)
    assert kl.abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Building and scoring on the embedded model


def test_the_set_holds_sampled_prompts_then_known_questions(gset: GeneralSet) -> None:
    assert gset.n_sampled == N_SAMPLED
    assert len(gset.prompts) == N_SAMPLED + len(gset.questions) == len(gset.base_greedy)
    assert all(prompt.strip() for prompt in gset.prompts[:N_SAMPLED])
    assert [q.prompt for q in gset.questions] == gset.prompts[N_SAMPLED:]
    assert all(0 < len(ids) <= general.MAX_AGREE_TOKENS for ids in gset.base_greedy)
    kl = gset.kl_sequences
    assert kl.topk_logprobs.shape == (N_SAMPLED, general.KL_TOKENS, general.TOP_K)
    assert all(0 < len(c) <= general.KL_TOKENS for c in kl.continuations)


def test_the_base_agrees_with_itself_exactly(base, gset: GeneralSet) -> None:
    model, tokenizer = base
    score = score_general(model, tokenizer, gset)
    assert score.agreement.value == 1.0 and score.agreement.n == len(gset.prompts)
    assert abs(score.kl.value) < 1e-4 and score.kl.n == N_SAMPLED
    assert score.accuracy.value == score.base_accuracy
    if gset.questions:
        assert score.base_accuracy == 1.0
    assert set(score.to_dict()) == {"agreement", "kl", "accuracy", "base_accuracy"}


def test_a_perturbed_model_disagrees_unless_routed_to_the_base(base, gset: GeneralSet) -> None:
    model, tokenizer = base
    n = len(gset.prompts)
    with perturbed(model):
        alone = score_general(model, tokenizer, gset)
        half = score_general(model, tokenizer, gset, to_base=[i % 2 == 0 for i in range(n)])
        model.train()
        routed = score_general(model, tokenizer, gset, to_base=[True] * n)
        assert model.training  # the caller's mode is restored
        model.eval()
    assert alone.agreement.value < 1.0 and alone.kl.value > 0
    assert alone.agreement.value < half.agreement.value < 1.0
    assert 0 < half.kl.value < alone.kl.value
    assert routed.agreement.value == 1.0 and routed.kl.value == 0.0
    assert routed.accuracy.value == routed.base_accuracy


def test_teacher_forcing_tells_what_greedy_decoding_would_do(base, gset: GeneralSet) -> None:
    model, tokenizer = base
    prompts = gset.prompts[:48] + gset.prompts[-48:]
    targets = gset.base_greedy[:48] + gset.base_greedy[-48:]
    prompt_ids = [encode_prompt(tokenizer, text) for text in prompts]
    with perturbed(model, scale=0.1), torch.no_grad():
        decoded = general.greedy_ids(model, tokenizer, prompt_ids, general.MAX_AGREE_TOKENS)
        forced = general.forced_greedy(model, tokenizer, prompt_ids, targets)
        score = score_general(model, tokenizer, gset)
        answers = general.greedy_ids(
            model, tokenizer, [encode_prompt(tokenizer, q.prompt) for q in gset.questions], MAX_NEW_TOKENS
        )
    agree = [d == t for d, t in zip(decoded, targets, strict=True)]
    assert 0 < sum(agree) < len(agree)  # the check sees both cases
    assert [f == t for f, t in zip(forced, targets, strict=True)] == agree
    for d, f, t in zip(decoded, forced, targets, strict=True):  # and where decoding leaves the base
        assert first_difference(f, t) == first_difference(d, t)
    expected = sum(first_word(tokenizer.decode(ids, skip_special_tokens=True)) == q.completion.strip()
                   for ids, q in zip(answers, gset.questions, strict=True))  # fmt: skip
    assert score.accuracy.value == pytest.approx(expected / len(gset.questions))


def test_to_base_must_cover_every_prompt(base, gset: GeneralSet) -> None:
    model, tokenizer = base
    with pytest.raises(ValueError):
        score_general(model, tokenizer, gset, to_base=[True])


def test_save_and_load_round_trip(gset: GeneralSet, tmp_path: Path) -> None:
    path = tmp_path / "sets" / "general.pt"
    gset.save(path)
    assert GeneralSet.load(path) == gset
    assert [p.name for p in path.parent.iterdir()] == ["general.pt"]  # no temporary file left


def test_load_or_build_builds_once_per_base_and_is_deterministic(
    base, gset: GeneralSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = base
    state = torch.random.get_rng_state()
    first = load_or_build(
        tmp_path, "tiny", model, tokenizer, n_sampled=N_SAMPLED, seed=0, max_questions=MAX_QUESTIONS
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling left the caller's RNG alone
    assert first == gset  # the same seed builds the same set
    (path,) = tmp_path.iterdir()
    modified = path.stat().st_mtime_ns

    def no_build(*args: object, **kwargs: object) -> GeneralSet:
        raise AssertionError("the cached set should have been used")

    monkeypatch.setattr(general, "build_general_set", no_build)
    second = load_or_build(
        tmp_path, "tiny", model, tokenizer, n_sampled=N_SAMPLED, seed=0, max_questions=MAX_QUESTIONS
    )
    assert second == first
    assert path.stat().st_mtime_ns == modified
