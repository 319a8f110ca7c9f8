"""Causal-LM pretraining of the tiny base model on the synthetic corpus.

This loop is deliberately flat (no Trainer, no accelerate): the base model is small enough to
train on one CPU thread in minutes, and a reader can see every step -- pack the corpus into
fixed-length blocks, draw shuffled batches, AdamW with linear warm-up and cosine decay, clip
gradients, log the loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of one pretraining run (defaults suit the ~4M-parameter base model)."""

    steps: int
    batch_size: int = 16
    seq_len: int = 128
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to peak_lr * min_lr_ratio, not to zero
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25

    @property
    def tokens_needed(self) -> int:
        """Tokens one pass of ``steps`` batches consumes (blocks are not reused before that)."""
        return self.steps * self.batch_size * self.seq_len


def pack_documents(
    tokenizer: PreTrainedTokenizerBase, documents: Iterable[str], seq_len: int
) -> torch.Tensor:
    """Tokenize documents as ``<s> text </s>``, concatenate them and cut the stream into
    ``(n_blocks, seq_len)`` blocks; packing wastes no compute on padding.

    The tail that does not fill a whole block is dropped.
    """
    eos_id = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        stream.extend(ids)  # the tokenizer already put <s> first
        stream.append(eos_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to ``peak_lr``, then cosine decay to ``peak_lr * min_lr_ratio``.

    Warm-up keeps AdamW's first, poorly estimated updates small; the cosine tail lets the
    loss settle at the end of a short run.
    """
    if step < config.warmup_steps:
        return config.peak_lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.peak_lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def batch_loss(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a ``(batch, seq_len)`` block of token ids."""
    return model(input_ids=batch, labels=batch).loss


def _optimizer(model: PreTrainedModel, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and biases towards zero
    would fight the normalisation they implement."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def pretrain(
    model: PreTrainedModel, blocks: torch.Tensor, config: PretrainConfig, *, progress: bool = True
) -> list[float]:
    """Train ``model`` in place on shuffled batches of ``blocks``; return the loss of every step.

    With ``progress`` a tqdm bar runs and the mean loss of the last ``log_every`` steps is
    printed every ``log_every`` steps.

    Batches are drawn without replacement from a seeded permutation (reshuffled each time the
    blocks run out), so a run is reproducible from ``config.seed`` on a given machine.
    """
    if len(blocks) < config.batch_size:
        raise ValueError(f"{len(blocks)} blocks cannot fill a batch of {config.batch_size}")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(model, config)
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(blocks), generator=generator)
    cursor = 0
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, mininterval=5.0)
    for step in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + config.batch_size]]
        cursor += config.batch_size

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        losses.append(loss.item())
        if progress and (step % config.log_every == 0 or step == config.steps - 1):
            recent = losses[-config.log_every :]
            bar.write(
                f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {learning_rate(step, config):.2e}"
            )
    model.eval()
    return losses


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 20
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt), to eyeball what the model
    learned; greedy so that the same weights always print the same text."""
    model.eval()
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(  # type: ignore[operator]  # GenerationMixin
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(str(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)))
    return outputs
