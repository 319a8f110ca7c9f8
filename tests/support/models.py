"""Tiny randomly initialised Llamas for tests of the training code: fast on one thread, and
shaped like the real models (attention and MLP projections the methods target)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama(
    vocab_size: int, hidden_size: int, max_positions: int, pad_token_id: int | None = None
) -> LlamaForCausalLM:
    """Two layers, two heads, an MLP twice as wide as ``hidden_size``; weights from seed 0, so
    that every test building the same shape gets the same model (bos 1, eos 2: LlamaConfig's)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def make_model(vocab_size: int) -> LlamaForCausalLM:
    """A model for the embedded tokenizer's vocabulary (training-loop tests)."""
    return llama(vocab_size, 64, 64, pad_token_id=0)


def tiny_llama() -> LlamaForCausalLM:
    """A 32-token, 16-wide model for tests that only need the projections' shapes and grads."""
    return llama(32, 16, 32)
