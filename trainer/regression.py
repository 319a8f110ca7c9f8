"""Every publish proves it forgot nothing: before a new task goes live, the worker scores
``continual`` as the server will serve it on every live task's evaluation set, and refuses the
publish when a task falls more than ``LAMINA_MAX_FORGETTING`` points below its score at the
previous live version (``LAMINA_FORGETTING_POLICY=warn`` publishes with a warning instead).

Why in the worker, before the publish: the benchmark knows whether a merge forgot, a running
store did not, and a merge that overwrote an earlier task went live whatever it did.

"As served" means what a ``continual`` request gets (:func:`adapters_store.routing.destination`):
with task routing a prompt goes to its task's model, the base or the merge, so a new task can
take an earlier task's prompts through its routing prototype as well as through the merge.

Each task keeps its evaluation set in its version's meta (``evaluation.examples``: the examples
the job held out, else a seeded sample of its training examples, at most ``EVAL_CAP``), and each
publish records its row (``evaluation.row``: task -> accuracy in %), so the rows of the live
tasks, oldest first, are the store's accuracy matrix. Tasks published before this carry no set
and are not scored.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.routing import MERGE, PromptEmbedder, Router, RoutingMode, destination, router_from_metas
from trainer.chat import prompt_and_answer
from trainer.config import TrainingExample
from trainer.contract.board import example_from_json
from trainer.evaluate import EXTRA_TOKENS, greedy_completions, matches
from trainer.loop import split_held_out
from trainer.routing import example_text
from trainer.served import merged_into

EVAL_CAP = 50  # examples per task's evaluation set: each publish decodes every live task's set

Deltas = Callable[[str | None], Mapping[str, torch.Tensor]]  # destination -> ΔW over the base


class WouldForget(Exception):
    """The candidate would lower an earlier task by more than the allowed points."""

    def __init__(self, message: str, row: dict[str, float], drops: dict[str, float]) -> None:
        super().__init__(message)
        self.row, self.drops = row, drops


def evaluation_examples(
    examples: Sequence[TrainingExample], hp: Any, validation: Sequence[TrainingExample] = ()
) -> list[TrainingExample]:
    """What a task is scored on at later publishes: the user's ``validation`` examples when
    given, else its held-out examples (inputs it never saw), or, for a task too small to hold any
    out, its training examples; a seeded sample of at most ``EVAL_CAP`` of them."""
    _, held_out = split_held_out(examples, hp)
    chosen = list(validation) or held_out or list(examples)
    if len(chosen) > EVAL_CAP:
        chosen = random.Random(hp.seed).sample(chosen, EVAL_CAP)
    return chosen


def evaluation_meta(examples: Sequence[TrainingExample], row: dict[str, float] | None) -> dict[str, Any]:
    """The ``evaluation`` entry of a task version's meta."""
    return {"examples": [asdict(e) for e in examples], **({"row": row} if row is not None else {})}


def stored_examples(meta: Mapping[str, Any]) -> list[TrainingExample]:
    return [example_from_json(e) for e in meta.get("evaluation", {}).get("examples", [])]


def previous_row(metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each live task's score at the last publish that scored it (the live tasks' rows, newest wins)."""
    row: dict[str, float] = {}
    for meta in metas:
        row.update(meta.get("evaluation", {}).get("row", {}))
    return row


def served_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    embedder: PromptEmbedder,
    router: Router,
    mode: RoutingMode,
    deltas: Deltas,
    examples: Sequence[TrainingExample],
) -> float:
    """Accuracy in % of ``continual`` on ``examples`` under ``router`` (the live tasks'): each
    prompt routed as the server routes it and answered greedily by the model it lands on."""
    texts = [example_text(e) for e in examples]
    if mode == "off":
        targets: list[str | None] = [MERGE] * len(texts)
    else:
        targets = [destination(d, mode) for d in router.decide(embedder.embed(texts))]
    prompts, answers = zip(*(prompt_and_answer(tokenizer, e) for e in examples), strict=True)
    budget = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + EXTRA_TOKENS
    correct = 0
    for target in dict.fromkeys(targets):
        indices = [i for i, t in enumerate(targets) if t == target]
        with merged_into(model, dict(deltas(target))):
            outputs = greedy_completions(model, tokenizer, [prompts[i] for i in indices], budget)
        correct += sum(matches(o, answers[i]) for o, i in zip(outputs, indices, strict=True))
    return round(100.0 * correct / len(examples), 2)


def check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    live_metas: Mapping[str, Mapping[str, Any]],
    candidate_metas: Mapping[str, Mapping[str, Any]],
    mode: RoutingMode,
    deltas: Deltas,
    max_drop: float,
) -> dict[str, float]:
    """The candidate's row (task -> accuracy in %, the new task included); raises
    :class:`WouldForget` when a live task drops more than ``max_drop`` points below its last score."""
    embedder = PromptEmbedder.from_model(model, tokenizer)
    router = router_from_metas(candidate_metas)
    before = previous_row(list(live_metas.values()))
    row: dict[str, float] = {}
    for name, meta in candidate_metas.items():
        examples = stored_examples(meta)
        if examples:
            row[name] = served_accuracy(model, tokenizer, embedder, router, mode, deltas, examples)
    drops = {n: round(before[n] - row[n], 2) for n in row if n in before and before[n] - row[n] > max_drop}
    if drops:
        worst = ", ".join(f"{n} {before[n]:.0f} % -> {row[n]:.0f} %" for n in drops)
        raise WouldForget(
            f"publishing this task would make `continual` forget: {worst} (more than {max_drop:g} points "
            "each, LAMINA_MAX_FORGETTING); the live model stays as it was",
            row,
            drops,
        )
    return row
