"""A task's routing prototype, fitted when it is published (:mod:`adapters_store.routing` holds
the signal and the decision; this module brings the base model's own text and the examples).

The general side of the calibration is ordinary chat requests (:mod:`trainer.requests`, templated,
so a frame a task's prompts share does not pass for the task) and text the *base* model samples
itself: short prefixes from
the BOS token, at temperature 1 with nucleus 0.95 and a fixed seed that differs from the one the
general-ability evaluation samples with, so the evaluation's prompts are never the ones the
threshold was fitted on. It depends on the base model alone, so it is computed once per
base-model fingerprint and kept in memory and, given a cache directory (the worker's
``<LAMINA_HOME>/cache``), on disk for every later process and store: sampling costs SmolLM2-135M
tens of CPU seconds, the embedded model about one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.atomic import write_atomically
from adapters_store.routing import AppliesTo, PromptEmbedder, RoutePrototype, fit_prototype, routing_text
from trainer.config import ChatExample, TrainingExample
from trainer.requests import calibration_requests
from trainer.subspace_growth import sample_from_bos

GENERAL_SAMPLES = 256  # base-sampled prefixes the thresholds are calibrated against
GENERAL_TOKENS = (6, 24)  # their lengths in tokens, drawn uniformly per prefix
GENERAL_SEED = 1_234  # not the general-ability evaluation's seed
_general_cache: dict[str, torch.Tensor] = {}


def example_text(example: TrainingExample) -> str:
    """What a request for this example would route on: its prompt, or its conversation's
    system and user turns before the answer."""
    if isinstance(example, ChatExample):
        *context, _answer = example.messages
        return routing_text(messages=[(m.role, m.content) for m in context])
    return routing_text(example.prompt)


def sample_general_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int = GENERAL_SAMPLES,
    seed: int = GENERAL_SEED,
) -> list[str]:
    """``n`` short texts the model samples from its BOS token (its own notion of ordinary text),
    each cut to a length drawn from GENERAL_TOKENS."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lengths = torch.randint(GENERAL_TOKENS[0], GENERAL_TOKENS[1] + 1, (n,))
            sequences = sample_from_bos(model, tokenizer, n, int(lengths.max()), None)  # (n, 1 + new)
    finally:
        model.train(was_training)
    texts = [
        str(tokenizer.decode(row[1 : 1 + int(k)], skip_special_tokens=True)).strip()
        for row, k in zip(sequences, lengths, strict=True)
    ]
    return [t for t in texts if t]


CACHE_VERSION = 1  # part of the file name: bump when what is sampled changes


def general_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    embedder: PromptEmbedder,
    fingerprint: str,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """The routing vectors of base-sampled text, computed once per base model: kept in this
    process, and in ``cache_dir/routing`` when one is given (an unreadable file is recomputed)."""
    if fingerprint in _general_cache:
        return _general_cache[fingerprint]
    path = None if cache_dir is None else cache_dir / "routing" / f"{fingerprint}-v{CACHE_VERSION}.pt"
    vectors = None
    if path is not None and path.exists():
        try:
            vectors = torch.load(path, weights_only=True)
        except Exception:  # a truncated or foreign file: sample again
            vectors = None
    if vectors is None:
        vectors = embedder.embed(sample_general_texts(model, tokenizer))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: torch.save(vectors, tmp))
    _general_cache[fingerprint] = vectors
    return vectors


def fit_task_prototype(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    fingerprint: str,
    applies_to: AppliesTo = "matching",
    cache_dir: Path | None = None,
    with_requests: bool = True,
) -> RoutePrototype:
    """The task's prototype from its training prompts, against base-sampled text and ordinary chat
    requests (``with_requests`` False: the text alone, as before the requests were added; for the
    benchmark's comparison). Call it on the base model (no task's ΔW merged in): the general text
    must be the base model's own."""
    embedder = PromptEmbedder.from_model(model, tokenizer)
    task = embedder.embed([example_text(e) for e in examples])
    general = general_vectors(model, tokenizer, embedder, fingerprint, cache_dir)
    requests = embedder.embed([routing_text(r) for r in calibration_requests()]) if with_requests else None
    return fit_prototype(task, general, applies_to, requests)
