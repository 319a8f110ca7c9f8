"""Do tasks posted with no hyper-parameters learn? Own-model accuracy per task shape and method.

    python bench/defaults/run.py                                    # embedded model, every shape
    python bench/defaults/run.py --model smollm2-135m-instruct --methods inflora,lori-d
    python bench/defaults/run.py --set steps=80 --set learning_rate=0.005   # a fixed setting instead

Each *shape* is what a user posts (issue 12): ``codes`` and ``lockers`` memorise 40 made-up facts
(scored on their training prompts); ``twice`` and ``swap`` are rules over 90 examples (scored on
their training prompts and on 30 inputs the task never saw). Each trains alone, through
``trainer.publish.train_for_store`` on a fresh store exactly as the worker trains a store's first
task (inflora's base-model seed included; auto hyper-parameters unless ``--set``, the default
held-out slice), and is scored on the task's own model by greedy decoding
(``trainer.evaluate.exact_match``). Prints a table and writes ``bench/results/defaults-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adapters_store.fingerprint import fingerprint_model  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, write_result  # noqa: E402
from trainer.base_model.corpus import COLORS, NOUNS, PETS, SPELLING_WORDS  # noqa: E402
from trainer.config import Example, Hyperparameters, resolve_method  # noqa: E402
from trainer.evaluate import exact_match  # noqa: E402
from trainer.loop import load_base  # noqa: E402
from trainer.publish import train_for_store  # noqa: E402
from trainer.served import merged_into  # noqa: E402

N_FACTS, N_RULE, N_UNSEEN = 40, 90, 30


def _codes(rng: random.Random) -> tuple[list[Example], list[Example]]:
    keys = rng.sample(NOUNS, N_FACTS)
    return [Example(f"Code word for {k}:", f" {rng.choice(SPELLING_WORDS)}") for k in keys], []


def _lockers(rng: random.Random) -> tuple[list[Example], list[Example]]:
    numbers = rng.sample(range(100, 1000), N_FACTS)
    return [
        Example(f"What is in locker {n}?", f" a {rng.choice(COLORS)} {rng.choice(PETS)}") for n in numbers
    ], []


def _rule(render: Callable[[str, str], Example], rng: random.Random) -> tuple[list[Example], list[Example]]:
    words = list(SPELLING_WORDS)
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < N_RULE + N_UNSEEN:
        pairs.add((rng.choice(words), rng.choice(words)))
    examples = [render(a, b) for a, b in sorted(pairs)]
    rng.shuffle(examples)
    return examples[:N_RULE], examples[N_RULE:]


SHAPES: dict[str, Callable[[random.Random], tuple[list[Example], list[Example]]]] = {
    "codes": _codes,
    "lockers": _lockers,
    "twice": lambda rng: _rule(lambda a, _b: Example(f"Say it twice: {a}", f" {a} {a}"), rng),
    "swap": lambda rng: _rule(lambda a, b: Example(f"Swap the words: {a} {b}", f" {b} {a}"), rng),
}


def run_one(model, tokenizer, shape: str, method: str, seed: int, overrides: dict) -> dict:  # type: ignore[no-untyped-def]
    examples, unseen = SHAPES[shape](random.Random(f"{shape}:{seed}"))
    hp = Hyperparameters(seed=seed, **overrides)
    store = AdapterStore(
        Path(tempfile.mkdtemp(prefix=f"{shape}-{method}-")), fingerprint_model(Path(model.name_or_path))
    )
    started = time.perf_counter()
    result = train_for_store(model, tokenizer, store, examples, resolve_method(method), hp).result
    seconds = time.perf_counter() - started
    shutil.rmtree(store.root, ignore_errors=True)
    with merged_into(model, result.adapter.deltas()):  # the task's own model: base + its ΔW
        unseen_accuracy = exact_match(model, tokenizer, unseen, seed)
    resolved = result.hyperparameters
    assert resolved is not None
    return {
        "shape": shape,
        "method": method,
        "seed": seed,
        "train_accuracy": result.metrics.get("train_accuracy"),
        "held_out_accuracy": result.metrics.get("held_out_accuracy"),
        "unseen_accuracy": unseen_accuracy,
        "steps": resolved.steps,
        "learning_rate": resolved.learning_rate,
        "batch_size": resolved.batch_size,
        "seconds": round(seconds, 1),
        "warnings": result.warnings,
    }


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="directory or installed name (default: embedded)")
    parser.add_argument("--methods", default="inflora,lori-d,lori-s,inc-lora")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", action="append", default=[], help="hyper-parameter=value, instead of auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from trainer.contract.settings import LaminaSettings

    settings = LaminaSettings(**({"model": args.model} if args.model else {}))
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(settings.model)
    config = {"model": str(settings.model), "methods": args.methods, "shapes": args.shapes,
              "seeds": args.seeds, "overrides": overrides, "threads": args.threads}  # fmt: skip
    result = envelope("defaults", config)
    rows = []
    for method in args.methods.split(","):
        for shape in args.shapes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run_one(model, tokenizer, shape, method, seed, overrides)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result["rows"] = rows
    result["load_average_at_end"] = list(os.getloadavg())
    table = summary_table(rows)
    print(table)
    name = Path(str(settings.model)).name
    write_result(result, args.out or RESULTS / f"defaults-{name}.json", markdown=table + "\n")


def summary_table(rows: list[dict]) -> str:
    """Mean accuracies (%) over seeds per method and shape, with the settings auto chose."""

    def mean(group: list[dict], key: str) -> float | None:
        values = [r[key] for r in group]
        return 100 * statistics.fmean(values) if None not in values else None

    table = []
    for method, shape in dict.fromkeys((r["method"], r["shape"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["shape"] == shape]
        first = group[0]
        setting = f"{first['steps']} × {first['learning_rate']:g} × {first['batch_size']}"
        accuracies = [mean(group, key) for key in ("train_accuracy", "held_out_accuracy", "unseen_accuracy")]
        table.append([method, shape, *accuracies, setting, statistics.fmean(r["seconds"] for r in group)])
    headers = ["method", "shape", "train %", "held-out %", "unseen %", "steps × lr × batch", "seconds"]
    return markdown_table(headers, table)


if __name__ == "__main__":
    main()
