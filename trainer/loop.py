"""Train one task's adapter: the whole training loop, readable top to bottom.

``train_task`` injects a LoRA adapter into a loaded base model with PEFT, lets the method's
parametrization initialise and constrain it, optimises

    loss = cross-entropy on the completion tokens + Σ λ · regularizer

with AdamW, and returns the task's adapter as a :class:`~adapters_store.lora.LoraAdapter`.
Afterwards the base model is exactly as it was passed in (adapter removed, flags restored), so
a worker loads its base model once and trains task after task on it.

Methods are looked up by name in the registries of :mod:`trainer.methods`; nothing here
branches on which method runs. Phases: with a parametrization that calibrates (LoRI-S, LoRAF),
the first ``calibration_steps`` steps train unmasked (or on the feasible set), then
``calibrate`` picks the mask and resets B, and the optimizer starts afresh for the main phase.
The adapter's set-up and tear-down (:func:`adapter_session`) and one optimizer step
(:func:`train_step`) are separate functions so that ``bench/train`` times exactly this code.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.lora import LoraAdapter
from adapters_store.subspace import Subspace
from trainer import auto
from trainer.activations import input_covariances
from trainer.chat import example_tokens
from trainer.config import Hyperparameters, MethodSpec, TrainingExample
from trainer.evaluate import exact_match
from trainer.methods.registry import (
    PARAMETRIZATIONS,
    REGULARIZERS,
    Layers,
    LoraParams,
    Parametrization,
    Regularizer,
)
from trainer.methods.regularizers import history_factors

PROGRESS_EVERY = 5  # report progress every this many steps (and at the last one)
LEARNED_ACCURACY = 0.5  # below this share of its training prompts answered exactly, a task warns
IGNORE_INDEX = -100  # label of tokens the loss skips (the prompt, the padding)
_ADAPTER = "task"  # PEFT's adapter name while training; not visible in the result
_PEFT_PREFIX = "base_model.model."


class TrainingCancelled(Exception):
    """``should_stop()`` returned True; the base model has already been restored."""


@dataclass
class TrainResult:
    """The new task's adapter (fp32, masks filled for LoRI-S / LoRAF) and what training measured."""

    adapter: LoraAdapter
    metrics: dict[str, float | int | str]
    losses: list[float] = field(default_factory=list)  # task loss of every step, calibration included
    hyperparameters: Hyperparameters | None = None  # as trained: every "auto" value resolved
    warnings: list[str] = field(default_factory=list)  # e.g. the task did not learn its examples


def select_device(setting: str = "auto") -> torch.device:
    """The device ``LAMINA_DEVICE`` names: ``auto`` is CUDA when torch sees a GPU, else the CPU;
    an explicit ``cuda`` without one is refused, not silently trained on the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"LAMINA_DEVICE={setting}, but torch sees no CUDA device")
    return device


def load_base(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in fp32 (training and ΔW maths stay in fp32) onto ``device``, and its
    tokenizer. The training loop follows the model's device."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Data: tokenize once, then an endless shuffled stream of padded batches.


def tokenize(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[TrainingExample], max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, labels −100 on the tokens the loss skips.

    Prompt/completion: prompt + completion + EOS, the prompt skipped. Chat: the conversation
    rendered with the model's chat template, only its trained assistant turns learned. Too
    long sequences lose their start, never the last answer's (see :mod:`trainer.chat`).
    """
    encoded = []
    for index, example in enumerate(examples):
        try:
            ids, trained = example_tokens(tokenizer, example, max_seq_len)
        except ValueError as error:
            raise ValueError(f"example {index}: {error}") from error
        labels = [t if learned else IGNORE_INDEX for t, learned in zip(ids, trained, strict=True)]
        encoded.append((ids, labels))
    return encoded


def batches(
    encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, attention_mask, labels), each (b, T), forever, reshuffling every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start : start + batch_size]]
            yield padded_batch(chunk, pad_id, device)


def forward_batches(
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[tuple[list[int], list[int]]],
    device: torch.device,
    batch_size: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every sequence once, in order, as (input_ids, attention_mask) batches: for passes that
    only look at activations (inflora's input covariances)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [
        padded_batch(encoded[start : start + batch_size], pad_id, device)[:2]
        for start in range(0, len(encoded), batch_size)
    ]


def padded_batch(
    chunk: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (b, T): right-padded to the longest sequence."""
    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (b, T)
    labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # (b, T)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (b, T)
    for row, (ids, labs) in enumerate(chunk):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion) tokens."""
    vocab = logits.shape[-1]
    predictions = logits[:, :-1].reshape(-1, vocab)  # (b·(T−1), V): position t predicts token t+1
    targets = labels[:, 1:].reshape(-1)  # (b·(T−1),)
    return F.cross_entropy(predictions.float(), targets, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# PEFT plumbing.


def lora_layers(peft_model: nn.Module) -> Layers:
    """The injected LoRA weights by base-model path (``model.layers.0.self_attn.q_proj``)."""
    layers: Layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and _ADAPTER in module.lora_A:
            A = cast(nn.Parameter, module.lora_A[_ADAPTER].weight)  # (r, d_in)
            B = cast(nn.Parameter, module.lora_B[_ADAPTER].weight)  # (d_out, r)
            layers[name.removeprefix(_PEFT_PREFIX)] = LoraParams(
                A=A, B=B, scale=float(module.scaling[_ADAPTER])
            )
    return layers


def stack_history_into_forward(
    model: nn.Module, layers: Layers, history: list[LoraAdapter]
) -> list[RemovableHandle]:
    """Add Σ_{i<t} ΔW_i x, frozen, to each target module's output (``MethodSpec.stack_history``)."""
    handles = []
    for name, p in layers.items():
        factors = history_factors(history, name)
        if factors is None:
            continue
        B_cat, A_cat = (t.to(device=p.A.device, dtype=p.A.dtype) for t in factors)  # (d_out, R), (R, d_in)

        def add_history(_module: nn.Module, inputs: tuple, output: torch.Tensor, B_cat=B_cat, A_cat=A_cat):
            return output + (inputs[0].to(A_cat.dtype) @ A_cat.T) @ B_cat.T  # (..., d_in) -> (..., d_out)

        handles.append(model.get_submodule(name).register_forward_hook(add_history))
    return handles


def _optimizer(layers: Layers, hp: Hyperparameters) -> torch.optim.AdamW:
    params = [t for p in layers.values() for t in (p.A, p.B) if t.requires_grad]
    assert hp.learning_rate is not None, "resolve the auto hyper-parameters first (trainer.auto.resolve)"
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)


# ---------------------------------------------------------------------------------------------
# One task's adapter session and one training step (``train_task`` and ``bench/train`` share them).


def causal_lm_loss(
    peft_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The task loss of one batch: completion cross-entropy of the adapted model.

    Logits are computed only from the position before the batch's first labelled token on: the
    output layer (V × d, e.g. 49152 × 576) costs a fifth of a small model's forward pass per
    position, and a prompt's positions predict nothing the loss counts.
    """
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()  # (n, 1): columns with a label
    keep = input_ids.shape[1] - int(labelled[0]) + 1 if len(labelled) else input_ids.shape[1]
    logits = peft_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
    ).logits  # (b, keep, V): positions T − keep … T − 1
    return completion_loss(logits, labels[:, -keep:])


@dataclass
class Session:
    """A task's adapter injected into the base model, ready to train: everything a step needs."""

    peft_model: nn.Module
    layers: Layers
    parametrization: Parametrization
    regularizers: dict[str, Regularizer]
    lambdas: dict[str, float]
    optimizer: torch.optim.Optimizer
    hp: Hyperparameters

    def start_main_phase(self) -> None:
        """End of calibration (LoRI-S, LoRAF): pick the mask, reset B, fresh optimizer moments."""
        self.parametrization.calibrate(self.layers)
        self.optimizer = _optimizer(self.layers, self.hp)


@contextmanager
def adapter_session(
    model: nn.Module,
    method: MethodSpec,
    hp: Hyperparameters,
    history: list[LoraAdapter],
    subspace: Subspace | None = None,
) -> Iterator[Session]:
    """Inject the task's adapter into ``model`` (PEFT), set it up for ``method`` and yield the session.

    On exit, also on errors, ``model`` is put back exactly as it was: adapter removed, history
    hooks removed, ``requires_grad`` flags and train/eval mode restored. The parametrization and
    regularizers are built before the model is touched, so their ``ValueError``s leave it alone.
    """
    parametrization = PARAMETRIZATIONS[method.parametrization](hp, method, history, subspace)
    lambdas = method.lambdas(hp)
    regularizers = {name: REGULARIZERS[name](hp, history) for name in lambdas}

    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(
        r=hp.r,
        lora_alpha=hp.lora_alpha,
        target_modules=list(hp.target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=_ADAPTER)
    hooks: list[RemovableHandle] = []
    try:
        layers = lora_layers(peft_model)
        parametrization.setup(layers)
        if method.stack_history:
            hooks = stack_history_into_forward(model, layers, history)  # model is wrapped in place
        model.train()
        yield Session(
            peft_model=peft_model,
            layers=layers,
            parametrization=parametrization,
            regularizers=regularizers,
            lambdas=lambdas,
            optimizer=_optimizer(layers, hp),
            hp=hp,
        )
    finally:
        parametrization.close()
        for handle in hooks:
            handle.remove()
        peft_model.unload()  # puts the original Linear modules back, unmerged
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


def train_step(
    session: Session, task_loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step: loss = task loss + Σ λ · regularizer, backward, clip, AdamW, re-apply masks.

    ``task_loss_fn()`` runs the forward pass of ``session.peft_model`` on one batch. Returns the
    task loss and the regularizer terms (without λ), still as tensors.
    """
    task_loss = task_loss_fn()
    terms = {name: regularizer(session.layers) for name, regularizer in session.regularizers.items()}
    loss = task_loss
    for name, term in terms.items():
        loss = loss + session.lambdas[name] * term

    loss.backward()
    optimizer = session.optimizer
    if session.hp.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [t for g in optimizer.param_groups for t in g["params"]], session.hp.max_grad_norm
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    session.parametrization.after_step(session.layers)  # re-apply masks
    return task_loss, terms


# ---------------------------------------------------------------------------------------------
# The loop.


def train_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    method: MethodSpec,
    hp: Hyperparameters,
    history: list[LoraAdapter],
    *,
    subspace: Subspace | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train one task's adapter on ``model`` and return it; ``model`` is left unchanged.

    ``history`` holds the earlier live tasks' adapters, oldest first, with their masks;
    ``subspace`` the store's protected input basis (inflora), if it has one.
    ``progress(step, total, task_loss)`` is called every few steps; ``should_stop()`` every step,
    and True raises :class:`TrainingCancelled`. Raises ``CapacityError`` (LoRAF, store full) and
    ``ValueError`` (examples or history that cannot be trained on) before the first step.
    """
    if not examples:
        raise ValueError("no training examples")
    started = time.perf_counter()
    device = next(model.parameters()).device
    trained_on, held_out = split_held_out(examples, hp)
    hp, chosen = auto.resolve(hp, method, len(trained_on))
    assert hp.steps is not None and hp.batch_size is not None  # resolved
    encoded = tokenize(tokenizer, trained_on, hp.max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = hp.steps

    losses: list[float] = []
    last_terms: dict[str, float] = {}
    with adapter_session(model, method, hp, history, subspace) as session:
        if getattr(session.parametrization, "wants_input_covariances", False):
            orient_by_inputs(session, tokenizer, encoded, device)
        calibration = session.parametrization.calibration_steps
        total = calibration + steps
        data = batches(encoded, hp.batch_size, pad_id, hp.seed, device)
        completion_tokens = 0

        step = 0
        while step < total or ("steps" in chosen and auto.keep_going(losses[calibration:], hp.steps)):
            if step == total:  # auto steps and the task is still far from learned: a few more
                steps += auto.EXTEND_STEPS
                total += auto.EXTEND_STEPS
            if step == calibration and calibration > 0:
                session.start_main_phase()  # mask chosen, B reset, fresh moments
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total}")

            input_ids, attention_mask, labels = next(data)  # (b, T) each
            batch_loss = partial(causal_lm_loss, session.peft_model, input_ids, attention_mask, labels)
            task_loss, terms = train_step(session, batch_loss)

            losses.append(task_loss.item())
            last_terms = {name: term.item() for name, term in terms.items()}
            completion_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
            if progress is not None and ((step + 1) % PROGRESS_EVERY == 0 or step + 1 == total):
                progress(step + 1, total, losses[-1])
            step += 1

        adapter = session.parametrization.export(session.layers)
        trainable = sum(t.numel() for g in session.optimizer.param_groups for t in g["params"])
        seconds = time.perf_counter() - started
        # The task's own model as it is served: its adapter, on top of the stacked earlier tasks.
        scores = {
            "train_accuracy": exact_match(session.peft_model, tokenizer, trained_on, hp.seed),
            "held_out_accuracy": exact_match(session.peft_model, tokenizer, held_out, hp.seed),
        }

    metrics: dict[str, float | int | str] = {
        "method": method.name,
        "initial_loss": losses[calibration],
        "final_loss": losses[-1],
        "steps": steps,
        "calibration_steps": calibration,
        "seconds": round(seconds, 3),
        "scoring_seconds": round(time.perf_counter() - started - seconds, 3),
        "examples": len(encoded),
        "held_out_examples": len(held_out),
        **{name: round(value, 4) for name, value in scores.items() if value is not None},
        "completion_tokens": completion_tokens,
        "trainable_params": trainable,  # tensors the optimizer updates, before masking (see mask_density)
        **{f"auto/{name}": value for name, value in chosen.items()},
        **{f"lambda/{name}": value for name, value in session.lambdas.items()},
        **{f"regularizer/{name}": value for name, value in last_terms.items()},
        **session.parametrization.metrics(),
    }
    hp = hp.model_copy(update={"steps": steps})  # as trained, auto extension included
    warnings = learning_warnings(scores["train_accuracy"], hp)
    return TrainResult(adapter=adapter, metrics=metrics, losses=losses, hyperparameters=hp, warnings=warnings)


def orient_by_inputs(
    session: Session,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[tuple[list[int], list[int]]],
    device: torch.device,
) -> None:
    """Hand the parametrization each target module's input covariance over the task's sequences,
    measured on the session's model before any step (B = 0, so: base + stacked earlier tasks)."""
    names = {name: f"{_PEFT_PREFIX}{name}.base_layer" for name in session.layers}  # the frozen Linear
    was_training = session.peft_model.training
    session.peft_model.eval()
    try:
        measured = input_covariances(
            session.peft_model, forward_batches(tokenizer, encoded, device), list(names.values())
        )
    finally:
        session.peft_model.train(was_training)
    session.parametrization.orient(session.layers, {name: measured[path] for name, path in names.items()})  # type: ignore[attr-defined]


def split_held_out(
    examples: Sequence[TrainingExample], hp: Hyperparameters
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(trained on, held out): a seeded sample of ``auto.held_out_count`` examples is kept aside to
    measure the task on inputs it never saw."""
    count = auto.held_out_count(len(examples), hp.validation_fraction)
    held = set(random.Random(hp.seed).sample(range(len(examples)), count))
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def learning_warnings(train_accuracy: float | None, hp: Hyperparameters) -> list[str]:
    """Why a finished task may not do what the user wants, in words they can act on."""
    if train_accuracy is None or train_accuracy >= LEARNED_ACCURACY:
        return []
    return [
        f"the task did not learn its examples: its model answers {train_accuracy:.0%} of its training "
        f"prompts exactly (after {hp.steps} steps at learning rate {hp.learning_rate}). Post it again with "
        "more hyperparameters.steps or a higher hyperparameters.learning_rate, or check that the "
        "completions follow from the prompts."
    ]
