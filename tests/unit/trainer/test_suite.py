"""The task suite: tasks, splits, scoring, orders and the continual-learning metrics."""

from __future__ import annotations

import math

import pytest

from trainer.base_model.corpus import generate_documents
from trainer.base_model.tokenizer import build_tokenizer
from trainer.suite import (
    ORDERS,
    TASKS,
    Example,
    accuracy,
    average_accuracy,
    backward_transfer,
    forgetting_rate,
    forward_transfer,
    get_order,
    get_task,
    score,
    seen_task_accuracy,
    summarize,
)
from trainer.suite.orders import SEED_ANALOGUES, SEED_ORDERS


def test_at_least_fifteen_distinct_tasks() -> None:
    assert len(TASKS) >= 15
    assert len({t.instruction for t in TASKS.values()}) == len(TASKS)
    assert len({t.make for t in TASKS.values()}) == len(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_split_is_deterministic_and_disjoint(name: str) -> None:
    task = get_task(name)
    train, test = task.split(seed=0)
    assert (train, test) == task.split(seed=0)
    assert len(train) >= 30 and len(test) >= 8
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train}) == len(train)
    assert task.split(seed=1) != (train, test)
    for example in train + test:
        assert example.prompt.startswith(f"{task.instruction}: ") and example.prompt.endswith(" ->")
        assert example.completion.startswith(" ") and example.completion.strip()


def test_completions_fit_the_generation_budget() -> None:
    """With the real tokenizer every answer plus ``</s>`` fits in ``max_new_tokens``."""
    tokenizer = build_tokenizer(generate_documents(0, 20_000))
    for task in TASKS.values():
        train, test = task.split(seed=0)
        longest = max(
            len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in train + test
        )
        assert longest < task.max_new_tokens, task.name


def test_corpus_does_not_contain_suite_examples() -> None:
    corpus = "\n".join(generate_documents(0, 5_000))
    assert "->" not in corpus
    for task in TASKS.values():
        _, test = task.split(seed=0)
        for example in test[:10]:
            assert example.prompt + example.completion not in corpus


def test_examples_answer_their_prompts() -> None:
    checks = {
        "add": lambda x: str(sum(int(n) for n in x.split(" and "))),
        "uppercase": str.upper,
        "reverse": lambda x: x[::-1],
        "first_letter": lambda x: x[0],
        "count_words": lambda x: str(len(x.split())),
        "sort_words": lambda x: " ".join(sorted(x.split())),
    }
    for name, solve in checks.items():
        task = get_task(name)
        _, test = task.split(seed=0)
        for example in test:
            input_text = example.prompt.removeprefix(f"{task.instruction}: ").removesuffix(" ->")
            assert example.completion == f" {solve(input_text)}"


def test_score_is_exact_match_after_strip() -> None:
    assert score(" tac", " tac")
    assert score("tac \n", " tac")
    assert score(" tac\nreverse: dog -> god", " tac")  # generation ran on past the answer
    assert not score(" Tac", " tac")
    assert not score(" tac tac", " tac")
    assert not score(" ta", " tac")
    assert not score("", " tac")
    examples = [Example("p ->", " a"), Example("q ->", " b")]
    assert accuracy([" a", " c"], examples) == 0.5
    with pytest.raises(ValueError):
        accuracy([" a"], examples)


def test_orders_reference_existing_tasks() -> None:
    assert sorted(ORDERS) == [1, 2, 3, 4, 5, 6, 7]
    for number, names in ORDERS.items():
        assert all(name in TASKS for name in names)
        assert len(set(names)) == len(names)
        assert len(names) == (4 if number <= 3 else 15)
    assert len(set(SEED_ANALOGUES.values())) == len(SEED_ANALOGUES) == 15
    assert len({ORDERS[n] for n in (4, 5, 6)}) == 3 and set(ORDERS[4]) == set(ORDERS[5]) == set(ORDERS[6])
    assert get_order(1) == tuple(SEED_ANALOGUES[d] for d in SEED_ORDERS[1])
    with pytest.raises(KeyError):
        get_order(8)


def test_the_learnable_order_has_fifty_unseen_test_prompts_per_task() -> None:
    for name in get_order(7):
        train, test = get_task(name).split(seed=0, n_train=200, n_test=50)
        assert (len(train), len(test)) == (200, 50), name
        assert not {e.prompt for e in train} & {e.prompt for e in test}, name


RULES = {  # each new task's answer, computed here independently of its maker
    "double": lambda x: str(2 * int(x)),
    "half": lambda x: str(int(x) // 2) if int(x) % 2 == 0 else "odd input",
    "successor": lambda x: str(int(x) + 1),
    "round": lambda x: str(int(math.floor(int(x) / 10 + 0.5)) * 10),
    "swap": lambda x: " ".join(reversed(x.split())),
    "second_word": lambda x: x.split()[1],
    "join": lambda x: "-".join(x.split()),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_new_tasks_answer_by_their_rule(name: str) -> None:
    train, test = get_task(name).split(seed=0, n_train=200, n_test=50)
    instruction = get_task(name).instruction
    for example in train + test:
        given = example.prompt.removeprefix(f"{instruction}: ").removesuffix(" ->")
        assert example.completion == f" {RULES[name](given)}", example


# acc[i][j]: accuracy on task j after training task i (upper triangle: before training task j).
ACC = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.3],
    [0.6, 0.9, 0.5],
]
SCRATCH = [0.95, 0.6, 0.4]


def test_metrics_on_hand_computed_matrix() -> None:
    # AA  = (0.6 + 0.9 + 0.5) / 3
    assert average_accuracy(ACC) == pytest.approx(2.0 / 3)
    # weighted by test sizes 1, 1, 2: (0.6 + 0.9 + 2 * 0.5) / 4
    assert average_accuracy(ACC, test_sizes=[1, 1, 2]) == pytest.approx(0.625)
    # BWT = ((0.6 - 0.9) + (0.9 - 0.8)) / 2
    assert backward_transfer(ACC) == pytest.approx(-0.1)
    # FR  = ((max(0.9, 0.7) - 0.6) + (max(0.8) - 0.9)) / 2
    assert forgetting_rate(ACC) == pytest.approx(0.1)
    # FWT (diagonal) = ((0.8 - 0.6) + (0.5 - 0.4)) / 2
    assert forward_transfer(ACC, SCRATCH) == pytest.approx(0.15)
    # FWT (previous, the formula's a_{i,i-1}) = ((0.1 - 0.6) + (0.3 - 0.4)) / 2
    assert forward_transfer(ACC, SCRATCH, entry="previous") == pytest.approx(-0.3)
    assert seen_task_accuracy(ACC) == pytest.approx([0.9, 0.75, 2.0 / 3])
    assert summarize(ACC, SCRATCH) == pytest.approx({"AA": 2.0 / 3, "BWT": -0.1, "FR": 0.1, "FWT": 0.15})


def test_metrics_accept_missing_upper_triangle_and_reject_missing_lower() -> None:
    lower = [[0.9, None, None], [0.7, 0.8, math.nan], [0.6, 0.9, 0.5]]
    assert summarize(lower, SCRATCH) == pytest.approx(summarize(ACC, SCRATCH))
    with pytest.raises(ValueError):
        forward_transfer(lower, SCRATCH, entry="previous")
    with pytest.raises(ValueError):
        backward_transfer([[0.9, None], [None, 0.8]])
    with pytest.raises(ValueError):
        average_accuracy([[0.9, 0.1]])
    assert (backward_transfer([[0.7]]), forgetting_rate([[0.7]]), forward_transfer([[0.7]], [0.5])) == (
        0,
        0,
        0,
    )
