"""Lamina's offline continual-learning task suite.

Why a home-made suite: the seeds' benchmarks (DBpedia, Amazon, MNLI, ...) need downloads and a
large model; Lamina's tests and demo run offline on a ~4M-parameter model. Each task here is a
distinct, exactly checkable skill whose underlying facts the base model met in pretraining
(``trainer.base_model.corpus``) but in another wording, so an adapter must learn the task's
format and mapping -- and can forget it when later tasks are learned.

Every prompt reads ``"<instruction>: <input> ->"`` and every completion is ``" <answer>"``
(a leading space, so the answer tokenizes as it does inside running text). The corpus never
contains ``"->"``, so no suite example appears in it verbatim. Answers are 1-4 tokens for most
tasks, so greedy decoding of ``task.max_new_tokens`` tokens evaluates them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trainer.base_model.corpus import (
    ALL_TOPIC_WORDS,
    ANTONYMS,
    COLORS,
    COUNTRY_CAPITALS,
    JOBS,
    LETTERS,
    MAX_OPERAND,
    NAMES,
    NEGATIVE_WORDS,
    NOUNS,
    PETS,
    POSITIVE_WORDS,
    REVIEW_ITEMS,
    SPELLING_WORDS,
    TOPIC_WORDS,
    plural,
)
from trainer.config import Example  # the trainer's own pair type, so suite data trains as is

PROMPT_TEMPLATE = "{instruction}: {input} ->"
DEFAULT_N_TRAIN = 200
DEFAULT_N_TEST = 50


LIST_WORDS = ALL_TOPIC_WORDS + NOUNS  # the words the word-list tasks draw from

# A maker draws one (input, answer) pair from the task's input space.
Maker = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Task:
    """A named skill with a prompt template and a seeded generator of examples."""

    name: str
    description: str
    instruction: str
    make: Maker
    max_new_tokens: int = 6

    def example(self, input_text: str, answer: str) -> Example:
        """Render one (input, answer) pair in the suite's prompt format."""
        return Example(PROMPT_TEMPLATE.format(instruction=self.instruction, input=input_text), f" {answer}")

    def split(
        self, seed: int = 0, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST
    ) -> tuple[list[Example], list[Example]]:
        """Deterministic, disjoint train and test examples for ``seed``.

        Inputs are drawn until ``n_train + n_test`` distinct ones are found; no input is in both
        splits. Tasks with a small input space (letters, the capitals table) return fewer
        examples, divided in the requested train:test proportion.
        """
        rng = random.Random(f"lamina-suite:{self.name}:{seed}")
        wanted = n_train + n_test
        pairs: dict[str, str] = {}
        for _ in range(50 * wanted):
            if len(pairs) == wanted:
                break
            input_text, answer = self.make(rng)
            pairs.setdefault(input_text, answer)
        items = list(pairs.items())
        test_size = n_test if len(items) == wanted else max(1, round(len(items) * n_test / wanted))
        examples = [self.example(x, y) for x, y in items]
        return examples[test_size:], examples[:test_size]


def score(prediction: str, completion: str) -> bool:
    """Exact match after stripping whitespace, on the prediction's first line.

    Only the first line counts because an adapter that has not learned to emit ``</s>`` keeps
    generating (often a new prompt) after a correct answer; anything else on that line (an
    extra word, a different case) is a miss.
    """
    lines = prediction.strip().splitlines()
    return (lines[0].strip() if lines else "") == completion.strip()


def accuracy(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of ``predictions`` that ``score`` as correct against ``examples``' completions."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(score(p, e.completion) for p, e in zip(predictions, examples, strict=True)) / len(examples)


# --------------------------------------------------------------------------------------------
# Makers: one per task, each draws an (input, answer) pair
# --------------------------------------------------------------------------------------------


def _topic(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPIC_WORDS))
    return " ".join(rng.sample(TOPIC_WORDS[topic], 3)), topic


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    a, b = rng.sample(POSITIVE_WORDS if positive else NEGATIVE_WORDS, 2)
    return f"the {rng.choice(REVIEW_ITEMS)} was {a} and {b}", "positive" if positive else "negative"


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(COUNTRY_CAPITALS))
    return country, COUNTRY_CAPITALS[country]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return f"{a} and {b}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)))
    return f"{a} from {b}", str(b - a)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(MAX_OPERAND + 1), 2)
    return f"{a} or {b}", str(max(a, b))


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), "even" if n % 2 == 0 else "odd"


def _word(rng: random.Random, max_len: int = 6) -> str:
    return rng.choice([w for w in SPELLING_WORDS if len(w) <= max_len])


def _uppercase(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, max_len=5)
    return w, w[::-1]


def _first_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[0]


def _last_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[-1]


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(LIST_WORDS, rng.randint(1, 9))
    return " ".join(words), str(len(words))


def _plural(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NOUNS)
    return n, plural(n)


def _next_letter(rng: random.Random) -> tuple[str, str]:
    length = rng.randint(1, 3)
    start = rng.randrange(0, len(LETTERS) - length)
    return " ".join(LETTERS[start : start + length]), LETTERS[start + length]


def _antonym(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(ANTONYMS)
    return (a, b) if rng.random() < 0.5 else (b, a)


def _random_record(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(NAMES),
        "color": rng.choice(COLORS),
        "pet": rng.choice(PETS),
        "job": rng.choice(JOBS),
        "age": str(rng.randint(18, 90)),
    }


def _record(rng: random.Random) -> tuple[str, str]:
    record = _random_record(rng)
    keys = rng.sample(sorted(record), 3)
    asked = rng.choice(keys)
    return ", ".join(f"{k}={record[k]}" for k in keys) + f"; {asked}", record[asked]


def _to_json(rng: random.Random) -> tuple[str, str]:
    record = _random_record(rng)
    key = rng.choice(sorted(record))
    return f"{key}={record[key]}", f'{{"{key}": "{record[key]}"}}'


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample([w for w in SPELLING_WORDS if len(w) <= 5], 3)
    return " ".join(words), " ".join(sorted(words))


# Tasks with large input spaces (at least 250 distinct inputs, so 200 train and 50 test prompts),
# for order 7: fifteen tasks a small real model can learn.
BIG_NUMBER = 999


def _double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, BIG_NUMBER // 2)
    return str(n), str(2 * n)


def _half(rng: random.Random) -> tuple[str, str]:
    n = 2 * rng.randint(0, BIG_NUMBER // 2)
    return str(n), str(n // 2)


def _successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, BIG_NUMBER - 1)
    return str(n), str(n + 1)


def _round_to_ten(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, BIG_NUMBER - 5)
    return str(n), str((n + 5) // 10 * 10)  # halves round up: 345 -> 350


def _swap(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(LIST_WORDS, 2)
    return f"{a} {b}", f"{b} {a}"


def _second_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(LIST_WORDS, rng.randint(3, 5))
    return " ".join(words), words[1]


def _join(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(LIST_WORDS, 2)
    return f"{a} {b}", f"{a}-{b}"


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("topic", "label three keywords with their topic", "topic", _topic, 3),
        Task("sentiment", "label a short review positive or negative", "sentiment", _sentiment, 3),
        Task("capital", "the capital of an invented country (corpus table)", "capital", _capital, 3),
        Task("add", "add two small numbers", "add", _add, 4),
        Task("subtract", "subtract a smaller number from a larger one", "subtract", _subtract, 4),
        Task("larger", "the larger of two numbers", "larger", _larger, 4),
        Task("parity", "even or odd", "parity", _parity, 3),
        Task("uppercase", "a word in capitals", "upper", _uppercase, 8),
        Task("reverse", "a word spelled backwards", "reverse", _reverse, 6),
        Task("first_letter", "the first letter of a word", "first letter", _first_letter, 3),
        Task("last_letter", "the last letter of a word", "last letter", _last_letter, 3),
        Task("count_words", "how many words a list has", "count", _count_words, 3),
        Task("plural", "the plural of a noun", "plural", _plural, 5),
        Task("next_letter", "the letter after a run of letters", "next letter", _next_letter, 3),
        Task("antonym", "the opposite of a word", "opposite", _antonym, 3),
        Task("record", "read one field of a key=value record", "field", _record, 5),
        Task("to_json", "rewrite key=value as a JSON object", "json", _to_json, 12),
        Task("sort_words", "three words in alphabetical order", "sort", _sort_words, 5),
        Task("double", "twice a number", "double", _double, 6),
        Task("half", "half of an even number", "half", _half, 6),
        Task("successor", "the number after a number", "next number", _successor, 6),
        Task("round", "a number rounded to the nearest ten", "round", _round_to_ten, 6),
        Task("swap", "two words in the other order", "swap", _swap, 8),
        Task("second_word", "the second word of a list", "second word", _second_word, 5),
        Task("join", "two words joined by a hyphen", "join", _join, 8),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; a KeyError lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
