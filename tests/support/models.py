"""A tiny randomly initialised Llama for tests of the training code: fast on one thread, and
shaped like the real models (attention and MLP projections the methods target)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()
