"""A general-ability evaluation fine enough to resolve about one point of forgetting.

The 62-question probe (:mod:`trainer.suite.probe`) keeps a dozen or so questions on a small
model, so a one-question change moves it by several points: too coarse to tell a method that
forgets a little from one that forgets nothing. This set asks three things of a model, each over
about a thousand prompts, always relative to the *base* model (no benchmark can be downloaded):

* **agreement**: the share of prompts whose first :data:`MAX_AGREE_TOKENS` greedy tokens equal the
  base's exactly. Prompts are sampled from the base itself (ordinary text as the base sees it)
  plus the known-answer questions. Exact token equality is strict and cheap, and is 1.0 by
  construction for the base.
* **kl**: the mean per-token KL(base ‖ model) on continuations the base sampled, with the base's
  distribution kept as its top :data:`TOP_K` log-probs plus one "rest" bucket, so that the base
  need not be run again when a model is scored. A graded measure: it moves before any greedy
  token flips.
* **accuracy**: the share of templated known-answer questions (sums, capitals, opposites and the
  probe's candidates) the model still answers, of those the base answers (first-word rule of
  :func:`trainer.suite.probe.first_word`).

Each comes with a 95 % interval (:func:`wilson` for shares, :func:`mean_interval` for the KL),
so a report can say whether a difference is resolved.

A router may answer a prompt with the base weights themselves (``to_base`` in
:func:`score_general`); such prompts agree exactly, have KL 0 and answer as the base did, by
construction, so they are not run at all. That keeps scoring cheap when most general prompts are
routed to the base.

Scoring decodes almost nothing: whether a model's greedy decoding reproduces the base's
tokens is read off one teacher-forced forward pass along them (the first position where its
argmax differs is where its decoding would leave them), and the KL is another forward pass along
the base's sampled continuations; only questions the model answers differently from the base
are decoded. The set itself is built once per base model (:func:`load_or_build`, keyed by the
model's fingerprint); it decodes the base's prompts, continuations and greedy answers.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.chat import encode_prompt
from trainer.config import Example
from trainer.suite import probe
from trainer.suite.intervals import Interval, mean_interval, topk_kl, wilson
from trainer.suite.questions import candidate_questions

__all__ = [  # the intervals are part of what a score is made of
    "GeneralScore", "GeneralSet", "Interval", "build_general_set", "candidate_questions",
    "load_or_build", "mean_interval", "score_general", "topk_kl", "wilson",
]  # fmt: skip

GENERAL_VERSION = 1  # part of the cache key: bump when what a built set holds changes
MAX_AGREE_TOKENS = 32  # greedy tokens compared for agreement
KL_TOKENS = 24  # tokens of the base's sampled continuation the KL is taken on
TOP_K = 32  # base log-probs kept per position (plus the rest of the mass)
PROMPT_MIN_TOKENS = 8  # sampled prompts' lengths are drawn from this range, per prompt
PROMPT_MAX_TOKENS = 24
TOP_P = 0.95  # nucleus of the base's sampling (as trainer.subspace_growth.base_subspace samples)
BUILD_BATCH_SIZE = 64  # rows per decoding batch; fixed, so a set depends only on model, n_sampled, seed
FORWARD_BATCH_SIZE = 16  # rows per teacher-forced forward pass: each holds (rows, 32, vocab) logits
MAX_SAMPLE_ROUNDS = 8  # rounds of prompt sampling before settling for fewer (blank or repeated ones)

# ---------------------------------------------------------------------------------------------
# The set


@dataclass(eq=False)
class KLSequences:
    """The base's sampled continuations and its coarsened distribution along them, per sampled
    prompt: enough to score KL(base ‖ model) later without the base.

    ``prompt_ids[i] + continuations[i]`` is sequence ``i`` (the continuation ends at EOS or after
    :data:`KL_TOKENS`). At the position that predicts continuation token ``j``, ``topk_ids`` and
    ``topk_logprobs`` (n, KL_TOKENS, k) hold the base's k likeliest next tokens and their
    log-probs, ``rest_logprobs`` (n, KL_TOKENS) the log of the mass left; positions from
    ``len(continuations[i])`` on are padding.
    """

    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    rest_logprobs: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KLSequences):
            return NotImplemented
        return (
            self.prompt_ids == other.prompt_ids
            and self.continuations == other.continuations
            and torch.equal(self.topk_ids, other.topk_ids)
            and torch.equal(self.topk_logprobs, other.topk_logprobs)
            and torch.equal(self.rest_logprobs, other.rest_logprobs)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "continuations": self.continuations,
            "topk_ids": self.topk_ids,
            "topk_logprobs": self.topk_logprobs,
            "rest_logprobs": self.rest_logprobs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KLSequences:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass
class GeneralSet:
    """What a model is scored against: prompts, the base's answers to them, and its distribution.

    ``prompts`` holds the ``len(kl_sequences)`` sampled prompts first (at most the ``n_sampled``
    asked for: blank, repeated and numerically ambiguous ones are left out), then ``questions``'
    prompts; ``base_greedy[i]`` is the base's greedy continuation of ``prompts[i]`` (at most
    :data:`MAX_AGREE_TOKENS` ids, through EOS).
    """

    prompts: list[str]
    questions: list[Example]
    base_greedy: list[list[int]]
    kl_sequences: KLSequences
    fingerprint: str | None = None
    version: int = field(default=GENERAL_VERSION)

    @property
    def n_sampled(self) -> int:
        return len(self.kl_sequences)

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename), so a reader never sees half a set."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "prompts": self.prompts,
            "questions": [[q.prompt, q.completion] for q in self.questions],
            "base_greedy": self.base_greedy,
            "kl_sequences": self.kl_sequences.to_dict(),
        }
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> GeneralSet:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(
            prompts=list(data["prompts"]),
            questions=[Example(prompt, completion) for prompt, completion in data["questions"]],
            base_greedy=[list(ids) for ids in data["base_greedy"]],
            kl_sequences=KLSequences.from_dict(data["kl_sequences"]),
            fingerprint=data["fingerprint"],
            version=int(data["version"]),
        )


@dataclass(frozen=True)
class GeneralScore:
    """A model's general ability relative to the base (see the module docstring)."""

    agreement: Interval
    kl: Interval
    accuracy: Interval
    base_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "agreement": self.agreement.to_dict(),
            "kl": self.kl.to_dict(),
            "accuracy": self.accuracy.to_dict(),
            "base_accuracy": self.base_accuracy,
        }


# ---------------------------------------------------------------------------------------------
# Running a model: batched greedy ids, sampling, logits along given continuations


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients, the caller's training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed the sampling RNG, leaving the caller's RNG state as it was."""
    device = _device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (b, T), rows aligned to the right as generation needs."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _through_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """``ids`` up to and including the first EOS: what follows it is padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def _before_eos(ids: list[int], eos_id: int | None) -> list[int]:
    through = _through_eos(ids, eos_id)
    return through[:-1] if eos_id is not None and through and through[-1] == eos_id else through


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (little padding, few wasted decoding steps); a fixed
    order, so the same rows always run in the same batches and give bit-identical results."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    max_new_tokens: int,
    *,
    sample: bool,
) -> list[list[int]]:
    """The new ids after each of ``rows`` (one left-padded batch), each through its first EOS."""
    device = _device(model)
    input_ids, attention_mask = _left_pad(rows, _pad_id(tokenizer))
    options: dict[str, Any] = (
        {"do_sample": True, "temperature": 1.0, "top_p": TOP_P, "top_k": 0}
        if sample
        else {"do_sample": False}
    )
    generated = model.generate(  # type: ignore[operator]  # GenerationMixin
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )  # (b, T + new)
    new = generated[:, input_ids.shape[1] :].tolist()
    return [_through_eos(ids, tokenizer.eos_token_id) for ids in new]


def greedy_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = BUILD_BATCH_SIZE,
) -> list[list[int]]:
    """Greedy continuation ids of tokenized ``prompts`` (through EOS), batched by length.

    Ids rather than text (as :func:`trainer.evaluate.greedy_completions` returns) because
    agreement compares tokens: two different token sequences can decode to the same text.
    """
    return _generate_all(model, tokenizer, prompts, max_new_tokens, batch_size, sample=False)


def _generate_all(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    *,
    sample: bool,
) -> list[list[int]]:
    """Continuation ids of every prompt, in the prompts' order, decoded in batches of similar length."""
    results: list[list[int]] = [[] for _ in prompts]
    for batch in _by_length([len(ids) for ids in prompts], batch_size):
        outputs = _generate(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, sample=sample)
        for index, ids in zip(batch, outputs, strict=True):
            results[index] = ids
    return results


def _continuation_logits(
    model: nn.Module,
    prompt_ids: Sequence[list[int]],
    continuations: Sequence[list[int]],
    slot: int,
    pad_id: int,
) -> torch.Tensor:
    """The model's logits (b, slot, V), float32, at the positions that predict each continuation
    token, in one forward pass (positions past a continuation's end hold padding).

    Prompts are padded on the left and continuations on the right to ``slot``, so every row's
    predicting positions are the last ``slot + 1``; only those logits are computed.
    """
    rows = [
        list(p) + list(c) + [pad_id] * (slot - len(c)) for p, c in zip(prompt_ids, continuations, strict=True)
    ]
    input_ids, attention_mask = _left_pad(rows, pad_id)
    for row, continuation in enumerate(continuations):
        attention_mask[row, input_ids.shape[1] - slot + len(continuation) :] = 0  # right padding
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device = _device(model)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        logits_to_keep=slot + 1,
    ).logits  # (b, slot + 1, V)
    return logits[:, :-1].float()


def _forced_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    continuations: Sequence[list[int]],
    width: int,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(row indices, their logits along their continuations (b, width, V)), one teacher-forced
    forward pass per batch of rows of similar length."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, continuations, strict=True)]
    for batch in _by_length(lengths, FORWARD_BATCH_SIZE):
        prompts, targets = [prompt_ids[i] for i in batch], [continuations[i] for i in batch]
        yield batch, _continuation_logits(model, prompts, targets, width, _pad_id(tokenizer))


def forced_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    targets: Sequence[list[int]],
) -> list[list[int]]:
    """Per row, the model's greedy (argmax) token at each position of ``targets[i]`` given the
    target's tokens before it (teacher forcing), as many as the target has.

    The model's own greedy decoding yields ``targets[i]`` exactly when this equals it (each
    position predicts the next target token, so by induction the decoding never leaves the
    target), and its first difference is where the decoding would leave it. One forward pass
    instead of MAX_AGREE_TOKENS decoding steps: several times cheaper on a CPU.
    """
    results: list[list[int]] = [[] for _ in prompt_ids]
    for batch, logits in _forced_logits(model, tokenizer, prompt_ids, targets, MAX_AGREE_TOKENS):
        argmax = logits.argmax(-1).tolist()  # (b, MAX_AGREE_TOKENS)
        for row, index in enumerate(batch):
            results[index] = argmax[row][: len(targets[index])]
    return results


def _first_difference(ids: list[int], reference: list[int]) -> int:
    """Where ``ids`` first differs from ``reference`` (their length when they are equal)."""
    return next((i for i, (a, b) in enumerate(zip(ids, reference, strict=True)) if a != b), len(reference))


# ---------------------------------------------------------------------------------------------
# Building


def _sample_prompts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int, seed: int) -> list[str]:
    """``n`` distinct non-blank prompts the base writes from BOS, each cut at a length drawn
    from the seed: text as the base sees it, not any one task's.

    Each round draws a length per row, then samples rows of similar length together so that a
    batch decodes only as many steps as its longest row needs; rows are kept in draw order.
    """
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    draws = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    with _seeded(model, seed):
        for _ in range(MAX_SAMPLE_ROUNDS):
            need = n - len(prompts)
            if need <= 0:
                break
            lengths = [
                draws.randint(PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS) for _ in range(need + need // 8 + 8)
            ]
            texts = [""] * len(lengths)
            for batch in _by_length(lengths, BUILD_BATCH_SIZE):
                longest = max(lengths[i] for i in batch)
                samples = _generate(model, tokenizer, [[start_id]] * len(batch), longest, sample=True)
                for index, ids in zip(batch, samples, strict=True):
                    cut = _before_eos(ids[: lengths[index]], tokenizer.eos_token_id)
                    texts[index] = str(tokenizer.decode(cut, skip_special_tokens=True))
            for text in texts:
                if text.strip() and text not in seen and len(prompts) < n:
                    seen.add(text)
                    prompts.append(text)
    return prompts


def _sample_continuations(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[list[int]], seed: int
) -> list[list[int]]:
    """One KL_TOKENS continuation per prompt, sampled by the base (temperature 1, nucleus)."""
    with _seeded(model, seed + 1):
        return _generate_all(model, tokenizer, prompt_ids, KL_TOKENS, BUILD_BATCH_SIZE, sample=True)


def _base_distribution(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    continuations: list[list[int]],
) -> KLSequences:
    """The base's top-k log-probs and rest mass along its own continuations, computed in the
    batches a model is scored in, so the base's KL to itself is exactly 0."""
    if not prompt_ids:
        empty = torch.zeros((0, KL_TOKENS, TOP_K))
        return KLSequences([], [], empty.int(), empty, torch.zeros((0, KL_TOKENS)))
    ids_rows: list[torch.Tensor] = [torch.empty(0)] * len(prompt_ids)
    value_rows: list[torch.Tensor] = [torch.empty(0)] * len(prompt_ids)
    rest_rows: list[torch.Tensor] = [torch.empty(0)] * len(prompt_ids)
    for batch, logits in _forced_logits(model, tokenizer, prompt_ids, continuations, KL_TOKENS):
        logprobs = torch.log_softmax(logits, dim=-1).cpu()  # (b, KL_TOKENS, V)
        values, ids = logprobs.topk(min(TOP_K, logprobs.shape[-1]), dim=-1)  # (b, KL_TOKENS, k)
        rest = logprobs.scatter(-1, ids, -math.inf).logsumexp(-1)  # (b, KL_TOKENS)
        for row, index in enumerate(batch):
            ids_rows[index], value_rows[index], rest_rows[index] = ids[row].int(), values[row], rest[row]
    return KLSequences(
        prompt_ids=prompt_ids,
        continuations=continuations,
        topk_ids=torch.stack(ids_rows),
        topk_logprobs=torch.stack(value_rows),
        rest_logprobs=torch.stack(rest_rows),
    )


def _answers(tokenizer: PreTrainedTokenizerBase, greedy: list[int], question: Example) -> bool:
    """The probe's rule on the first probe.MAX_NEW_TOKENS greedy tokens: the first word matches."""
    text = str(tokenizer.decode(greedy[: probe.MAX_NEW_TOKENS], skip_special_tokens=True))
    return probe.first_word(text) == question.completion.strip()


def _known_questions(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, candidates: Sequence[Example]
) -> list[Example]:
    """The candidate questions the base answers right, decoded for probe.MAX_NEW_TOKENS only
    (cheap: most candidates are dropped here)."""
    prompts = [encode_prompt(tokenizer, q.prompt) for q in candidates]
    outputs = greedy_ids(model, tokenizer, prompts, probe.MAX_NEW_TOKENS)
    return [q for q, ids in zip(candidates, outputs, strict=True) if _answers(tokenizer, ids, q)]


def _stable(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], greedy: list[list[int]]
) -> list[int]:
    """Indices of the rows whose greedy continuation the teacher-forced pass (what scoring runs)
    reproduces, in the batches scoring will use.

    Decoding step by step and one forward pass round differently; where the base's top two
    tokens are within that rounding, agreement would measure float noise, so such rows go.
    Dropping rows changes the batches, hence the loop (it ends at once unless something went).
    """
    kept = list(range(len(prompt_ids)))
    while True:
        forced = forced_greedy(model, tokenizer, [prompt_ids[i] for i in kept], [greedy[i] for i in kept])
        stable = [i for i, ids in zip(kept, forced, strict=True) if ids == greedy[i]]
        if len(stable) == len(kept):
            return kept
        kept = stable


def _reference_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    greedy: list[list[int]],
    questions: list[Example],
) -> list[int]:
    """The rows (sampled prompts, then ``questions``) the set keeps as the base's reference.

    A question goes when the longer greedy decoding no longer answers it (it can round
    differently from the short one that chose it), so the base scores exactly 1.0; any row goes
    whose greedy path the teacher-forced pass does not reproduce (:func:`_stable`).
    """
    first_question = len(prompt_ids) - len(questions)
    answered = [
        i
        for i in range(len(prompt_ids))
        if i < first_question or _answers(tokenizer, greedy[i], questions[i - first_question])
    ]
    stable = _stable(model, tokenizer, [prompt_ids[i] for i in answered], [greedy[i] for i in answered])
    return [answered[i] for i in stable]


def build_general_set(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_sampled: int = 800,
    seed: int = 0,
    fingerprint: str | None = None,
    max_questions: int | None = None,
) -> GeneralSet:
    """The general set of the base ``model``: (at most ``n_sampled``) sampled prompts with the
    base's continuations and distribution, and the known-answer questions it answers, all with
    its greedy answers. ``max_questions`` keeps an evenly spread subset of the candidate
    questions (a test's plumbing); None keeps them all.

    Deterministic under ``seed``; the caller's RNG state and training mode are left as they were.
    """
    with _inference(model):
        sampled = _sample_prompts(model, tokenizer, n_sampled, seed)
        candidates = _known_questions(model, tokenizer, _spread(candidate_questions(), max_questions))
        prompts = sampled + [q.prompt for q in candidates]
        prompt_ids = [encode_prompt(tokenizer, text) for text in prompts]
        greedy = greedy_ids(model, tokenizer, prompt_ids, MAX_AGREE_TOKENS)
        kept = _reference_rows(model, tokenizer, prompt_ids, greedy, candidates)
        sampled_kept = [i for i in kept if i < len(sampled)]
        sampled_ids = [prompt_ids[i] for i in sampled_kept]
        continuations = _sample_continuations(model, tokenizer, sampled_ids, seed)
        kl = _base_distribution(model, tokenizer, sampled_ids, continuations)
    return GeneralSet(
        prompts=[prompts[i] for i in kept],
        questions=[candidates[i - len(sampled)] for i in kept if i >= len(sampled)],
        base_greedy=[greedy[i] for i in kept],
        kl_sequences=kl,
        fingerprint=fingerprint,
    )


def _spread(items: list[Example], at_most: int | None) -> list[Example]:
    if at_most is None or len(items) <= at_most:
        return items
    return [items[round(i * len(items) / at_most)] for i in range(at_most)]


def cache_path(
    cache_dir: Path,
    fingerprint: str,
    *,
    n_sampled: int = 800,
    seed: int = 0,
    max_questions: int | None = None,
) -> Path:
    """Where the set of the base with ``fingerprint`` is kept: one file per base, version and
    sampling parameters, so a change to any of them builds a new set."""
    questions = "" if max_questions is None else f"-q{max_questions}"
    return Path(cache_dir) / f"general-{fingerprint}-v{GENERAL_VERSION}-n{n_sampled}-s{seed}{questions}.pt"


def load_or_build(
    cache_dir: Path, fingerprint: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **kw: Any
) -> GeneralSet:
    """The base's general set from ``cache_dir``, built (and saved) the first time.

    ``kw`` goes to :func:`build_general_set` (``n_sampled``, ``seed``). An unreadable or foreign
    file is rebuilt rather than trusted.
    """
    path = cache_path(
        cache_dir,
        fingerprint,
        n_sampled=kw.get("n_sampled", 800),
        seed=kw.get("seed", 0),
        max_questions=kw.get("max_questions"),
    )
    if path.exists():
        try:
            cached: GeneralSet | None = GeneralSet.load(path)
        except Exception:  # a truncated or older file: rebuild it
            cached = None
        if cached is not None and cached.fingerprint == fingerprint and cached.version == GENERAL_VERSION:
            return cached
    built = build_general_set(model, tokenizer, fingerprint=fingerprint, **kw)
    built.save(path)
    return built


# ---------------------------------------------------------------------------------------------
# Scoring


def _routing(to_base: Sequence[bool] | None, n: int) -> list[bool]:
    if to_base is None:
        return [False] * n
    if len(to_base) != n:
        raise ValueError(f"to_base has {len(to_base)} entries for {n} prompts")
    return [bool(flag) for flag in to_base]


def _divergence(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, gset: GeneralSet, routed: list[bool]
) -> list[int]:
    """Per prompt, how many of the base's greedy tokens the model's greedy decoding reproduces
    before it first differs (all of them when it agrees); all, without running the model, for
    the prompts routed to the base."""
    run = [i for i, base in enumerate(routed) if not base]
    prompt_ids = [encode_prompt(tokenizer, gset.prompts[i]) for i in run]
    forced = forced_greedy(model, tokenizer, prompt_ids, [gset.base_greedy[i] for i in run])
    reproduced = [len(ids) for ids in gset.base_greedy]
    for index, ids in zip(run, forced, strict=True):
        reproduced[index] = _first_difference(ids, gset.base_greedy[index])
    return reproduced


def _question_results(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gset: GeneralSet,
    reproduced: list[int],
    batch_size: int,
) -> list[bool]:
    """Whether the model answers each question: as the base does where its greedy decoding
    reproduces the base's first probe.MAX_NEW_TOKENS tokens, else from its own decoding (only
    those questions are decoded)."""
    offset = gset.n_sampled
    results = [_answers(tokenizer, gset.base_greedy[offset + j], q) for j, q in enumerate(gset.questions)]
    redo = [
        j
        for j in range(len(gset.questions))
        if reproduced[offset + j] < min(probe.MAX_NEW_TOKENS, len(gset.base_greedy[offset + j]))
    ]
    prompt_ids = [encode_prompt(tokenizer, gset.questions[j].prompt) for j in redo]
    for j, ids in zip(
        redo, greedy_ids(model, tokenizer, prompt_ids, probe.MAX_NEW_TOKENS, batch_size), strict=True
    ):
        results[j] = _answers(tokenizer, ids, gset.questions[j])
    return results


def _model_kl(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, kl: KLSequences, routed: list[bool]
) -> list[float]:
    """Per sampled prompt, the mean per-token KL(base ‖ model) on the base's continuation; 0 for
    prompts routed to the base."""
    values = [0.0] * len(kl)
    run = [i for i in range(len(kl)) if not routed[i]]
    prompt_ids = [kl.prompt_ids[i] for i in run]
    continuations = [kl.continuations[i] for i in run]
    for batch, logits in _forced_logits(model, tokenizer, prompt_ids, continuations, KL_TOKENS):
        rows = [run[i] for i in batch]
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        per_token = topk_kl(kl.topk_logprobs[rows], kl.topk_ids[rows], logprobs, kl.rest_logprobs[rows])
        for row, index in enumerate(rows):
            length = len(kl.continuations[index])
            values[index] = float(per_token[row, :length].mean()) if length else 0.0
    return values


def _nonnegative(interval: Interval) -> Interval:
    """A KL cannot be negative (the coarsened one neither): the normal interval's low end is
    clipped at 0 rather than reported below it."""
    return replace(interval, low=max(0.0, interval.low)) if not math.isnan(interval.low) else interval


def score_general(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gset: GeneralSet,
    *,
    to_base: Sequence[bool] | None = None,
    batch_size: int = 64,
) -> GeneralScore:
    """``model``'s agreement with the base, KL from it and accuracy on ``gset``.

    Agreement is read off one teacher-forced forward pass along the base's greedy tokens
    (:func:`forced_greedy`), which says exactly whether the model's greedy decoding would
    reproduce them; only the questions where the model departs from the base within the answer
    are decoded (``batch_size`` rows at a time). ``to_base`` (aligned with ``gset.prompts``)
    marks the prompts a router answers with the base weights: they are not run and count as the
    base's own answers.
    """
    routed = _routing(to_base, len(gset.prompts))
    with _inference(model):
        reproduced = _divergence(model, tokenizer, gset, routed)
        correct = _question_results(model, tokenizer, gset, reproduced, batch_size)
        kl_values = _model_kl(model, tokenizer, gset.kl_sequences, routed)
    offset = gset.n_sampled
    agree = sum(count == len(ids) for count, ids in zip(reproduced, gset.base_greedy, strict=True))
    base_correct = sum(
        _answers(tokenizer, gset.base_greedy[offset + j], q) for j, q in enumerate(gset.questions)
    )
    n_questions = len(gset.questions)
    return GeneralScore(
        agreement=wilson(agree, len(gset.prompts)),
        kl=_nonnegative(mean_interval(kl_values)),
        accuracy=wilson(sum(correct), n_questions),
        base_accuracy=base_correct / n_questions if n_questions else math.nan,
    )
