"""What a trained model answers: greedy decoding of prompts, and exact match against completions.

The job metrics (accuracy of a task on its training examples and on held-out ones) and the
benchmarks score models the same way, with this one decoder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.chat import prompt_and_answer
from trainer.config import TrainingExample

MAX_SCORED = 200  # examples decoded per accuracy figure (a seeded sample of larger sets)
EXTRA_TOKENS = 2  # decoded beyond the longest expected completion (room for EOS)


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of tokenized ``prompts``, batched with left padding."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = prompts[start : start + batch_size]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (b, T)
            attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (b, T)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(  # type: ignore[operator]  # GenerationMixin
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (b, T + new)
            texts.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def matches(prediction: str, expected: str) -> bool:
    """Exact match up to surrounding whitespace, allowing anything after a line break.

    A model that has not learned to stop keeps generating after a correct answer (often a new
    prompt on the next line); a different word, case or punctuation on the answer's own lines is
    a miss. For one-line answers this is the suite's ``score``.
    """
    answer, text = expected.strip(), prediction.strip()
    return text == answer or text.startswith(answer + "\n")


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    seed: int = 0,
    batch_size: int = 32,
) -> float | None:
    """Share of ``examples`` (a seeded sample of at most MAX_SCORED) that ``model`` answers exactly
    under greedy decoding, prompted as the server prompts it; None for no examples."""
    if not examples:
        return None
    chosen = list(examples)
    if len(chosen) > MAX_SCORED:
        chosen = random.Random(seed).sample(chosen, MAX_SCORED)
    prompts, answers = zip(*(prompt_and_answer(tokenizer, e) for e in chosen), strict=True)
    budget = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + EXTRA_TOKENS
    predictions = greedy_completions(model, tokenizer, list(prompts), budget, batch_size)
    return sum(matches(p, a) for p, a in zip(predictions, answers, strict=True)) / len(chosen)
