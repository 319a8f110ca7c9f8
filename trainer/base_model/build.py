"""Build Lamina's tiny Llama base model: tokenizer, random init, optional pretraining, save.

Why Llama: vLLM, ``transformers`` and PEFT all support ``LlamaForCausalLM`` natively, LoRA
targets (``q_proj`` ... ``down_proj``) have their usual names, and the same code paths serve
a real Llama on GPU. The shape is chosen for vLLM's CPU backend: head_dim = 256 / 4 = 64 is
one of the head sizes its attention kernels support.

Command line::

    python -m trainer.base_model.build --out models/lamina-tiny --pretrain-steps 1400

That command (seed 0, ~18 min on one CPU thread) made the shipped
``trainer/base_model/weights/lamina-tiny``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from trainer.base_model.corpus import generate_documents
from trainer.base_model.pretrain import PretrainConfig, greedy_continuations, pack_documents, pretrain
from trainer.base_model.tokenizer import build_tokenizer

DEFAULT_VOCAB_SIZE = 2048
DEFAULT_TOKENIZER_DOCS = 20_000
BUILD_INFO_FILE = "lamina_build.json"
# Rough corpus tokens per document (measured ~33 with the default tokenizer); only used to
# decide how many documents to generate, so an underestimate is harmless.
_TOKENS_PER_DOC_ESTIMATE = 25
SAMPLE_PROMPTS: tuple[str, ...] = (
    "The weather",
    "Q: What is the capital of",
    "12 + 7 =",
    "The word cat spelled backwards is",
    "I bought this phone last week.",
)


def model_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> LlamaConfig:
    """The base model's Llama configuration; ``overrides`` replace single fields (tests)."""
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A randomly initialised model; the same seed gives bit-identical weights.

    The global RNG is forked so that building a model leaves the caller's random state as it
    was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.float().eval()


def build_base_model(
    out_dir: Path,
    *,
    seed: int = 0,
    pretrain_steps: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer_docs: int = DEFAULT_TOKENIZER_DOCS,
    pretrain_config: PretrainConfig | None = None,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` directory to ``out_dir`` and return it.

    The directory holds config.json, generation_config.json, model.safetensors, the tokenizer
    files and ``lamina_build.json`` (how it was built, the loss curve). It loads with
    ``AutoModelForCausalLM``/``AutoTokenizer`` and with vLLM. The corpus, the tokenizer and the
    initial weights all derive from ``seed``; with ``pretrain_steps=0`` the output is
    byte-identical for a given seed. ``pretrain_config`` sets the other pretraining
    hyper-parameters (its ``steps`` is replaced by ``pretrain_steps``).
    """
    out_dir = Path(out_dir)
    started = time.monotonic()
    tokenizer = build_tokenizer(generate_documents(seed, tokenizer_docs), vocab_size=vocab_size)
    model = init_model(model_config(tokenizer), seed)

    losses: list[float] = []
    config: PretrainConfig | None = None
    if pretrain_steps > 0:
        base = pretrain_config or PretrainConfig(steps=pretrain_steps, seed=seed)
        config = dataclasses.replace(base, steps=pretrain_steps)
        n_docs = math.ceil(config.tokens_needed / _TOKENS_PER_DOC_ESTIMATE)
        blocks = pack_documents(tokenizer, generate_documents(seed, n_docs), config.seq_len)
        losses = pretrain(model, blocks, config, progress=progress)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {
        "seed": seed,
        "vocab_size": len(tokenizer),
        "tokenizer_docs": tokenizer_docs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain": dataclasses.asdict(config) if config else None,
        "loss_first": losses[0] if losses else None,
        "loss_last_50_mean": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        "losses_every_25": losses[::25],
        "build_seconds": round(time.monotonic() - started, 1) if losses else None,
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: build (and optionally pretrain) the base model, print samples."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=PretrainConfig.seq_len)
    parser.add_argument("--lr", type=float, default=PretrainConfig.peak_lr, help="peak learning rate")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = PretrainConfig(
        steps=max(1, args.pretrain_steps),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        peak_lr=args.lr,
        seed=args.seed,
    )
    out = build_base_model(
        args.out,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
        vocab_size=args.vocab_size,
        pretrain_config=config,
    )
    print(f"wrote {out}")
    print((out / BUILD_INFO_FILE).read_text())
    if args.pretrain_steps > 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(out))
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        prompts = list(SAMPLE_PROMPTS)
        for prompt, text in zip(prompts, greedy_continuations(model, tokenizer, prompts), strict=True):
            print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
