"""The six task orders of the continual-learning experiments, after the seeds.

N-LoRA (Table 7) and PS-LoRA (Table 9) evaluate on the same six sequences: Orders 1-3 over
four classification datasets (the "standard" benchmark) and Orders 4-6 (PS-LoRA's Long 1-3)
over fifteen. Lamina gives each seed dataset one suite task and keeps the seeds' permutations
exactly, so that position effects (which task comes first, which tasks are neighbours) match
the papers. The pairing follows a loose kinship where one exists (DBpedia topic -> ``topic``,
Amazon reviews -> ``sentiment``, Yahoo QA -> ``capital``, WiC word sense -> ``antonym``,
QQP paraphrase -> ``uppercase``, MultiRC reading -> ``record``); the rest is arbitrary.
"""

from __future__ import annotations

SEED_ANALOGUES: dict[str, str] = {
    "dbpedia": "topic",
    "amazon": "sentiment",
    "yahoo": "capital",
    "ag": "add",
    "yelp": "parity",
    "imdb": "reverse",
    "sst-2": "first_letter",
    "mnli": "subtract",
    "cb": "count_words",
    "rte": "next_letter",
    "wic": "antonym",
    "copa": "plural",
    "qqp": "uppercase",
    "boolqa": "larger",
    "multirc": "record",
}

SEED_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "ag"),
    2: ("dbpedia", "amazon", "ag", "yahoo"),
    3: ("yahoo", "amazon", "ag", "dbpedia"),
    4: (
        "mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb",
        "yelp", "amazon", "sst-2", "dbpedia", "ag", "multirc", "yahoo",
    ),
    5: (
        "multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte",
        "imdb", "sst-2", "dbpedia", "ag", "yelp", "amazon", "yahoo",
    ),
    6: (
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb",
        "sst-2", "dbpedia", "ag", "yahoo", "multirc", "boolqa", "wic",
    ),
}  # fmt: skip

# Order 7 is Lamina's own: fifteen tasks a small real model (SmolLM2-135M) can learn, each with
# at least 250 distinct inputs (200 train and 50 test prompts): orders 4-6 hold tasks with 10-44
# test prompts (small input spaces) and two (`reverse`, `capital`) that model does not learn at all.
LEARNABLE_ORDER = (
    "topic", "double", "sentiment", "swap", "add", "half", "larger", "second_word",
    "parity", "round", "count_words", "join", "record", "successor", "sort_words",
)  # fmt: skip

ORDERS: dict[int, tuple[str, ...]] = {
    **{number: tuple(SEED_ANALOGUES[d] for d in datasets) for number, datasets in SEED_ORDERS.items()},
    7: LEARNABLE_ORDER,
}


def get_order(number: int) -> tuple[str, ...]:
    """Suite task names of order ``number`` (1-7), in training order."""
    try:
        return ORDERS[number]
    except KeyError:
        raise KeyError(f"unknown order {number}; known: {sorted(ORDERS)}") from None
