"""A LoRA trained by PEFT alone, outside Lamina: what a user would bring to POST /admin/adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "Q: What colour is the sky on Zorblat? A: The sky on Zorblat is green."


def train_external_lora(base_model_dir: Path, out_dir: Path, steps: int = 30, r: int = 4) -> Path:
    """A few Adam steps of plain ``get_peft_model`` on one sentence, saved with ``save_pretrained``
    (no Lamina code involved); returns the directory holding the two PEFT files."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(TEXT, return_tensors="pt")
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(out_dir))
    return out_dir
