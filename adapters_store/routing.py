"""Which prompts ``continual`` answers with what it learned, and which with the base model itself.

Every task's update moves the answers to some prompts that are not the task's: no update vanishes
on every input. So the continual model routes by input. A prompt that looks like a learned task's
prompts goes to that task's model or to the merge of every task (:func:`destination`, by the
server's routing mode); any other prompt goes to the base weights, untouched, so what the base
model knew before the first task stays exactly what it was.

The signal is the cheapest one that measured well (no forward pass): the mean of the prompt's
token embeddings (the model's own input embedding matrix), centred on the mean of text the base
model samples itself and L2-normalised. Each task is summarised at publish time by a
:class:`RoutePrototype`: the centroid of its training prompts and a threshold on the cosine to
it, calibrated between the task's own prompts (each scored leave-one-out, as an unseen prompt
would be) and the base-sampled text. A prompt matches a task when its cosine to the task's
centroid reaches that task's threshold; when it matches several, the nearest centroid (the highest
cosine) wins. The thresholds differ by task (a broad task's is low), so the largest margin over a
threshold would favour the broadest task: on SmolLM2-135M it sent 3.8 % of the suite's task
prompts to another task, the nearest centroid none.

A task can also say it applies to every prompt (a style, a persona, a language): while such a task
is live, every prompt goes to the merge. The prototypes are stored in each task version's
``meta.json`` (``routing``), so a server rebuilds its table from the live tasks alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

SIGNAL = "embedding-mean-v1"  # what a prototype's vectors are; a server ignores prototypes of another
AppliesTo = Literal["matching", "all"]
RoutingMode = Literal["task", "merge", "off"]  # LAMINA_CONTINUAL_ROUTING
MERGE = "<merge>"  # a destination: the live merge (None is the base model, a name a task's model)


class Tokenizer(Protocol):
    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


def routing_text(prompt: str | None = None, messages: Iterable[tuple[str, str]] = ()) -> str:
    """The text a routing decision reads: a completion prompt, or a conversation's system and
    user turns (the assistant's own turns say what the model answered, not what was asked; the
    chat template is left out, since it is the same for every prompt and would dominate)."""
    parts = [prompt] if prompt else []
    parts += [content for role, content in messages if role != "assistant" and content]
    return "\n".join(parts)


class PromptEmbedder:
    """Prompt → the routing signal, from the base model's input embedding matrix alone."""

    def __init__(self, embeddings: torch.Tensor, tokenizer: Tokenizer) -> None:
        self.embeddings = embeddings.detach().float()  # (vocab, d)
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: Path, tokenizer: Tokenizer) -> PromptEmbedder:
        """Read only the input embedding matrix from the model's safetensors files."""
        from safetensors import safe_open

        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key.endswith("embed_tokens.weight"):
                        return cls(f.get_tensor(key), tokenizer)
        raise FileNotFoundError(f"no embed_tokens.weight in the safetensors files of {model_dir}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Tokenizer) -> PromptEmbedder:
        embedding = model.get_input_embeddings()  # type: ignore[operator]
        return cls(embedding.weight, tokenizer)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Mean token embedding of ``ids`` (zeros for none or for ids outside the vocabulary)."""
        valid = [i for i in ids if 0 <= i < self.embeddings.shape[0]]
        if not valid:
            return torch.zeros(self.embeddings.shape[1])
        return self.embeddings[torch.tensor(valid)].mean(dim=0)  # (d,)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) raw mean embeddings of ``texts``."""
        if not texts:
            return torch.zeros(0, self.embeddings.shape[1])
        return torch.stack([self.embed_ids(self.ids(t)) for t in texts])


def _unit(vectors: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    centred = vectors - center
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@dataclass(frozen=True)
class RoutePrototype:
    """One task's routing summary: its centroid, the threshold on the cosine to it, and the
    centre (the mean of base-sampled text) the vectors were taken relative to."""

    centroid: torch.Tensor  # (d,) unit vector
    center: torch.Tensor  # (d,)
    threshold: float
    applies_to: AppliesTo = "matching"
    signal: str = SIGNAL

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        """Cosine of raw mean embeddings (n, d) to the centroid → (n,)."""
        return _unit(vectors, self.center) @ self.centroid

    def to_dict(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "applies_to": self.applies_to,
            "threshold": round(self.threshold, 6),
            "centroid": [round(float(x), 6) for x in self.centroid],
            "center": [round(float(x), 6) for x in self.center],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutePrototype:
        return cls(
            centroid=torch.tensor(data["centroid"], dtype=torch.float32),
            center=torch.tensor(data["center"], dtype=torch.float32),
            threshold=float(data["threshold"]),
            applies_to=data.get("applies_to", "matching"),
            signal=str(data.get("signal", SIGNAL)),
        )


def calibrate_threshold(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """The cosine threshold with the fewest errors both ways, each side weighted as a share.

    ``positives`` are the task's own prompts' scores (leave-one-out), ``negatives`` base-sampled
    text's. Separable scores give the midpoint of the gap; otherwise the cut minimising
    (missed task prompts / #positives + routed general prompts / #negatives), lower on a tie,
    since a task prompt sent to the base loses its answer outright."""
    pos, neg = positives.sort().values, negatives.sort().values
    if len(neg) == 0:
        return float(pos[0]) - 1e-6
    if pos[0] > neg[-1]:
        return float(pos[0] + neg[-1]) / 2
    candidates = torch.cat([pos, neg]).unique()  # sorted; a cut "score >= c" at each
    missed = torch.searchsorted(pos, candidates, right=False).float() / len(pos)
    routed = (len(neg) - torch.searchsorted(neg, candidates, right=False)).float() / len(neg)
    best = int(torch.argmin(missed + routed))  # argmin returns the first (lowest) on a tie
    return float(candidates[best])


def fit_prototype(
    task_vectors: torch.Tensor,
    general_vectors: torch.Tensor,
    applies_to: AppliesTo = "matching",
    requests: torch.Tensor | None = None,
) -> RoutePrototype:
    """A task's prototype from its training prompts' raw vectors (n, d) and base-sampled text's
    (m, d): the centre is the general text's mean, the centroid the task's mean direction, and
    each training prompt is scored against the centroid of the others (an unseen prompt's view).
    ``requests`` (k, d), ordinary chat requests, join the general side of the threshold (not the
    centre): text sampled from BOS never looks like a question, so without them a frame the
    task's prompts share ("What is the name of …?") passes for the task."""
    center = general_vectors.mean(dim=0) if len(general_vectors) else torch.zeros(task_vectors.shape[1])
    units = _unit(task_vectors, center)  # (n, d)
    total = units.sum(dim=0)
    centroid = total / total.norm().clamp_min(1e-8)
    if len(units) > 1:
        others = total - units  # (n, d): each row the sum of the other prompts
        loo = (units * (others / others.norm(dim=-1, keepdim=True).clamp_min(1e-8))).sum(dim=-1)
    else:
        loo = units @ centroid
    general_side = general_vectors if requests is None else torch.cat([general_vectors, requests])
    negatives = _unit(general_side, center) @ centroid if len(general_side) else torch.zeros(0)
    return RoutePrototype(centroid, center, calibrate_threshold(loo, negatives), applies_to)


@dataclass(frozen=True)
class Decision:
    """Where one prompt goes: the matched task with the nearest centroid (None: the base model)."""

    task: str | None
    margin: float  # its cosine minus its threshold (negative: no task matched, the best of them)
    everything: bool = False  # a live task applies to every prompt: the merge answers it


class Router:
    """The live tasks' prototypes; decides per prompt which task it matches, if any."""

    def __init__(self, prototypes: Mapping[str, RoutePrototype]) -> None:
        self.prototypes = {n: p for n, p in prototypes.items() if p.signal == SIGNAL}
        self.everything = [n for n, p in self.prototypes.items() if p.applies_to == "all"]

    def decide(self, vectors: torch.Tensor) -> list[Decision]:
        """Decisions for raw mean embeddings (n, d). With no prototype nothing is routed to a task
        (the merge has nothing of its own to add). While a task that applies to every prompt is
        live, a prompt that matches no other task goes to it (``everything``: the merge, which
        holds it) instead of to the base; a task's own prompts still go to that task, so what it
        learned is answered as it learned it."""
        n = vectors.shape[0]
        matching = {name: p for name, p in self.prototypes.items() if p.applies_to != "all"}
        unmatched = (
            Decision(self.everything[-1], float("inf"), everything=True)
            if self.everything
            else Decision(None, float("-inf"))
        )
        if not matching:
            return [unmatched] * n
        names = list(matching)
        cosines = torch.stack([p.score(vectors) for p in matching.values()], dim=1)  # (n, tasks)
        margins = cosines - torch.tensor([p.threshold for p in matching.values()])
        nearest = cosines.masked_fill(margins < 0, float("-inf")).argmax(dim=1)  # among the matched
        closest = margins.max(dim=1).values  # below zero: no task matched
        decisions = []
        for row, (i, m) in enumerate(zip(nearest, closest, strict=True)):
            if float(m) >= 0:
                decisions.append(Decision(names[int(i)], float(margins[row, int(i)])))
            else:
                decisions.append(unmatched if self.everything else Decision(None, float(m)))
        return decisions

    def to_merge(self, vectors: torch.Tensor) -> list[bool]:
        """Per prompt: True when it matches a task (what it learned answers), False when the base does."""
        return [d.task is not None for d in self.decide(vectors)]


def destination(decision: Decision, mode: RoutingMode, tasks_exact: bool = True) -> str | None:
    """Where a ``continual`` prompt goes under ``mode``: a task's name (its own model), MERGE, or
    None (the base model itself). ``task`` mode sends a matching prompt to the merge instead when a
    live task applies to every prompt, or when the tasks' models are not served exactly
    (``tasks_exact`` False: a dense merge, whose tasks' models are truncated SVDs)."""
    if mode == "off":
        return MERGE
    if decision.task is None:
        return None
    return decision.task if mode == "task" and tasks_exact and not decision.everything else MERGE


def router_from_metas(metas: Mapping[str, Mapping[str, Any]]) -> Router:
    """The router of the live tasks, from their versions' meta (tasks published before routing
    existed carry no prototype: a store with such a task routes everything to the merge, as it
    was served when they were trained)."""
    legacy = RoutePrototype(torch.zeros(1), torch.zeros(1), threshold=0.0, applies_to="all")
    return Router(
        {
            name: RoutePrototype.from_dict(meta["routing"]) if "routing" in meta else legacy
            for name, meta in metas.items()
        }
    )
