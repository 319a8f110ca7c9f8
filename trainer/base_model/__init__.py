"""Lamina's own tiny base model: a synthetic corpus, a BPE tokenizer, a small Llama, and the
loop that pretrains it (so the project runs offline, with no model hub)."""

from pathlib import Path

# The pretrained model shipped with the package (built by ``trainer.base_model.build``).
SHIPPED_MODEL_DIR: Path = Path(__file__).resolve().parent / "weights" / "lamina-tiny"
