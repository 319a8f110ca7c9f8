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

The base is scored too, as the matrix's first column: on a small general-ability set
(:mod:`trainer.suite.general`, built once per base model and cached), the share of prompts on
which ``continual`` as served gives the base's own greedy answer (``evaluation.general``). A
publish that lowers it by more than ``LAMINA_MAX_GENERAL_DROP`` points is refused like a
forgotten task, unless the new task was taught to apply to every prompt (it is meant to change
them: a warning instead, :func:`trainer.publish.run_gate`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.evaluation import latest_general, latest_row
from adapters_store.routing import MERGE, PromptEmbedder, Router, RoutingMode, destination, router_from_metas
from trainer.chat import encode_prompt, prompt_and_answer
from trainer.config import TrainingExample
from trainer.contract.board import example_from_json
from trainer.evaluate import EXTRA_TOKENS, greedy_completions, matches
from trainer.loop import split_held_out
from trainer.routing import example_text
from trainer.served import merged_into
from trainer.suite.general import GeneralSet, forced_greedy

EVAL_CAP = 50  # examples per task's evaluation set: each publish decodes every live task's set
GENERAL_SAMPLES = 96  # base-sampled prompts of the gate's general set (plus its known-answer questions)
GENERAL_QUESTIONS = 64  # candidate known-answer questions (kept where the base answers them)

Deltas = Callable[[str | None], Mapping[str, torch.Tensor]]  # destination -> ΔW over the base


@dataclass(frozen=True)
class Scores:
    """A candidate's scores as served: each task's accuracy in % (``row``) and the general
    set's agreement with the base in % (None without a general set)."""

    row: dict[str, float]
    general: float | None = None
    general_prompts: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # per prompt, for the next check to reuse

    def general_meta(self) -> dict[str, Any] | None:
        if self.general is None:
            return None
        return {"agreement": self.general, "n": self.general_prompts}


class WouldForget(Exception):
    """The candidate would lower an earlier task (or the base's general answers) by more than
    the allowed points."""

    def __init__(
        self, message: str, scores: Scores, drops: dict[str, float], general_drop: float | None
    ) -> None:
        super().__init__(message)
        self.scores, self.drops, self.general_drop = scores, drops, general_drop

    @property
    def row(self) -> dict[str, float]:
        return self.scores.row


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


def evaluation_meta(examples: Sequence[TrainingExample], scores: Scores | None) -> dict[str, Any]:
    """The ``evaluation`` entry of a task version's meta."""
    meta: dict[str, Any] = {"examples": [asdict(e) for e in examples]}
    if scores is not None:
        meta["row"] = scores.row
        if scores.general is not None:
            meta["general"] = scores.general_meta()
        if scores.details:
            meta["details"] = scores.details
    return meta


def stored_examples(meta: Mapping[str, Any]) -> list[TrainingExample]:
    return [example_from_json(e) for e in meta.get("evaluation", {}).get("examples", [])]


def served_targets(
    embedder: PromptEmbedder, router: Router, mode: RoutingMode, texts: list[str]
) -> list[str | None]:
    """Where the server sends each text of a ``continual`` request: MERGE, a task or None (the base)."""
    if mode == "off":
        return [MERGE] * len(texts)
    return [destination(d, mode) for d in router.decide(embedder.embed(texts))]


def model_ids(targets: Sequence[str | None], versions: Mapping[str, str]) -> list[str | None]:
    """What answered each prompt, as a name that pins the weights: ``base``, or a task's version
    id (``codes/v1``: a version never changes); None for the merge and the candidate, which are
    new at every publish."""
    return ["base" if t is None else None if t == MERGE else versions.get(t) for t in targets]


def reusable(previous: Mapping[str, Any] | None, ids: Sequence[str | None]) -> dict[int, bool]:
    """The results a previous check recorded (``{"to": ids, "ok": results}``) for the prompts
    that the same weights answer now: greedy answers to the same prompt from the same weights
    are the same, so they need not be decoded again."""
    if not previous or len(previous.get("to", [])) != len(ids):
        return {}
    return {i: bool(ok) for i, (now, then, ok) in enumerate(zip(ids, previous["to"], previous["ok"], strict=True))
            if now is not None and now == then}  # fmt: skip


def general_results(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    targets: Sequence[str | None],
    deltas: Deltas,
    gset: GeneralSet,
    known: Mapping[int, bool],
) -> list[bool]:
    """Per general prompt, whether ``continual`` as served (``targets``) gives the base's greedy
    answer, token for token. Prompts routed to the base agree by construction and are not run,
    nor are those in ``known``; the others are checked by one teacher-forced pass along the
    base's answer (:func:`trainer.suite.general.forced_greedy`)."""
    results = [True if t is None else known.get(i) for i, t in enumerate(targets)]
    todo = [i for i, r in enumerate(results) if r is None]
    for target in dict.fromkeys(targets[i] for i in todo):
        indices = [i for i in todo if targets[i] == target]
        prompt_ids = [encode_prompt(tokenizer, gset.prompts[i]) for i in indices]
        references = [gset.base_greedy[i] for i in indices]
        with merged_into(model, dict(deltas(target))):
            forced = forced_greedy(model, tokenizer, prompt_ids, references)
        for i, ids, ref in zip(indices, forced, references, strict=True):
            results[i] = ids == ref
    return [bool(r) for r in results]


def served_results(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    targets: Sequence[str | None],
    deltas: Deltas,
    examples: Sequence[TrainingExample],
    known: Mapping[int, bool],
) -> list[bool]:
    """Per example, whether ``continual`` answers it right when each prompt goes where
    ``targets`` says and is answered greedily by the model it lands on (``known`` results are
    taken as they are)."""
    results: list[bool | None] = [known.get(i) for i in range(len(examples))]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        prompts, answers = zip(*(prompt_and_answer(tokenizer, examples[i]) for i in todo), strict=True)
        budget = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + EXTRA_TOKENS
        for target in dict.fromkeys(targets[i] for i in todo):
            group = [k for k, i in enumerate(todo) if targets[i] == target]
            with merged_into(model, dict(deltas(target))):
                outputs = greedy_completions(model, tokenizer, [prompts[k] for k in group], budget)
            for k, output in zip(group, outputs, strict=True):
                results[todo[k]] = matches(output, answers[k])
    return [bool(r) for r in results]


def general_digest(gset: GeneralSet) -> str:
    """Which general set a recorded result belongs to."""
    return hashlib.sha256("\n".join(gset.prompts).encode()).hexdigest()[:16]


def percent(results: Sequence[bool]) -> float:
    return round(100.0 * sum(results) / len(results), 2)


def check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    live_metas: Mapping[str, Mapping[str, Any]],
    candidate_metas: Mapping[str, Mapping[str, Any]],
    mode: RoutingMode,
    deltas: Deltas,
    max_drop: float,
    general: GeneralSet | None = None,
    max_general_drop: float = 100.0,
    versions: Mapping[str, str] | None = None,
) -> Scores:
    """The candidate's scores (task -> accuracy in %, the new task included, and the general
    agreement when ``general`` is given); raises :class:`WouldForget` when a live task drops more
    than ``max_drop`` points below its last score, or the general agreement more than
    ``max_general_drop``.

    ``versions`` (live task name -> version id) lets the check reuse the per-prompt results the
    previous check recorded in the newest live version's meta wherever the same weights answer
    the same prompt now (the base, or a task's own version): under task routing a publish then
    decodes little beyond the new task's own set and the prompts its routing takes, instead of
    every live task's set (``evaluation.details``)."""
    embedder = PromptEmbedder.from_model(model, tokenizer)
    router = router_from_metas(candidate_metas)
    live = list(live_metas.values())
    before = latest_row(live)
    versions = versions or {}
    recorded = live[-1].get("evaluation", {}).get("details", {}) if live else {}
    row: dict[str, float] = {}
    details: dict[str, Any] = {"tasks": {}}
    for name, meta in candidate_metas.items():
        examples = stored_examples(meta)
        if not examples:
            continue
        targets = served_targets(embedder, router, mode, [example_text(e) for e in examples])
        ids = model_ids(targets, versions)
        key = versions.get(name)  # the candidate has no version yet: nothing recorded to reuse
        known = reusable(recorded.get("tasks", {}).get(key), ids) if key else {}
        results = served_results(model, tokenizer, targets, deltas, examples, known)
        row[name] = percent(results)
        if key:
            details["tasks"][key] = {"to": ids, "ok": results}
    agreement = None
    if general is not None:
        targets = served_targets(embedder, router, mode, general.prompts)
        ids = model_ids(targets, versions)
        digest = general_digest(general)
        previous = recorded.get("general")
        known = reusable(previous, ids) if previous and previous.get("set") == digest else {}
        results = general_results(model, tokenizer, targets, deltas, general, known)
        agreement = percent(results)
        details["general"] = {"set": digest, "to": ids, "ok": results}
    scores = Scores(row, agreement, len(general.prompts) if general is not None else 0, details)
    drops = {n: round(before[n] - row[n], 2) for n in row if n in before and before[n] - row[n] > max_drop}
    reasons = [f"{n} {before[n]:.0f} % -> {row[n]:.0f} %" for n in drops]
    general_before = latest_general(live)
    general_drop = None
    if agreement is not None and general_before is not None and general_before - agreement > max_general_drop:
        general_drop = round(general_before - agreement, 2)
        reasons.append(
            f"the base's own answers to general prompts {general_before:.0f} % -> {agreement:.0f} % "
            f"(more than {max_general_drop:g} points, LAMINA_MAX_GENERAL_DROP)"
        )
    if reasons:
        raise WouldForget(
            f"publishing this task would make `continual` forget: {', '.join(reasons)}"
            + (f" (more than {max_drop:g} points each, LAMINA_MAX_FORGETTING)" if drops else "")
            + "; the live model stays as it was",
            scores,
            drops,
            general_drop,
        )
    return scores
