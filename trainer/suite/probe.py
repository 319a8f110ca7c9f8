"""A general-ability probe: what the base model knew before any task, and whether it still does.

Continual learning can forget the tasks it learned and also what the base model knew before
any of them (LoRAF measures the latter on GSM8K). Lamina cannot download a benchmark, so the
probe is built from the model itself: a fixed list of plain questions (capitals, small sums,
word facts), of which only those the *base* model answers correctly are kept. By construction the
base model scores 100 % on its probe; after each task the continual model is scored on the same
questions, and the drop is forgetting of general knowledge.

An answer counts when its first word (trailing punctuation stripped) is the expected one: a base
model completing "The capital of France is" says " Paris." and then keeps going.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.chat import encode_prompt
from trainer.config import Example
from trainer.evaluate import greedy_completions

MAX_NEW_TOKENS = 5

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin", "China": "Beijing",
    "England": "London", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana",
    "Thailand": "Bangkok", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Belgium": "Brussels", "Argentina": "Buenos", "Turkey": "Ankara", "Iran": "Tehran",
    "Chile": "Santiago", "Mexico": "Mexico",
}  # fmt: skip
_SUMS = [(2, 3), (4, 5), (1, 1), (3, 3), (6, 2), (7, 1), (5, 5), (10, 10), (8, 1), (9, 0), (2, 2), (4, 4)]
_FACTS = [
    ("The opposite of hot is", "cold"), ("The opposite of up is", "down"), ("The opposite of big is", "small"),
    ("The opposite of fast is", "slow"), ("The opposite of day is", "night"), ("The opposite of black is", "white"),
    ("A baby cat is called a", "kitten"), ("A baby dog is called a", "puppy"), ("A baby cow is called a", "calf"),
    ("Water freezes at zero degrees", "Celsius"), ("The largest planet in the solar system is", "Jupiter"),
    ("There are seven days in a", "week"), ("There are twelve months in a", "year"),
    ("The color of the sky is", "blue"), ("Bees make", "honey"), ("The sun rises in the", "east"),
    ("The sun sets in the", "west"), ("The chemical symbol for water is", "H2O"),
    ("The author of Romeo and Juliet is William", "Shakespeare"), ("The tallest animal in the world is the", "giraffe"),
]  # fmt: skip

CANDIDATES: tuple[Example, ...] = tuple(
    [Example(f"The capital of {country} is", f" {city}") for country, city in _CAPITALS.items()]
    + [Example(f"{a} + {b} =", f" {a + b}") for a, b in _SUMS]
    + [Example(prompt, f" {answer}") for prompt, answer in _FACTS]
)


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def answered(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Example]
) -> list[bool]:
    """Whether ``model`` answers each question with its expected first word (greedy decoding)."""
    prompts = [encode_prompt(tokenizer, q.prompt) for q in questions]
    outputs = greedy_completions(model, tokenizer, prompts, MAX_NEW_TOKENS)
    return [first_word(out) == q.completion.strip() for out, q in zip(outputs, questions, strict=True)]


def build_probe(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """The candidates the (base) ``model`` answers correctly: its own general-ability probe."""
    return [q for q, ok in zip(CANDIDATES, answered(model, tokenizer, CANDIDATES), strict=True) if ok]


def probe_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, probe: Sequence[Example]
) -> float | None:
    """Share of the probe ``model`` still answers; None for an empty probe (a model that knew none)."""
    if not probe:
        return None
    results = answered(model, tokenizer, probe)
    return sum(results) / len(results)
