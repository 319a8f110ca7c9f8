"""A small byte-level BPE tokenizer trained on the synthetic corpus.

Why byte-level: every string a user sends (any script, any symbol) still encodes, so the
server never meets an unknown character. Why individual digits: numbers split into single
digits make the corpus's arithmetic learnable by a tiny model (one embedding per digit rather
than one per number). Why a ``<s>`` post-processor: vLLM and ``transformers`` both encode a
prompt with ``add_special_tokens=True``, so the tokenizer itself must add the ``<s>`` the model
saw at the start of every pretraining document.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, UNK)
MODEL_MAX_LENGTH = 512


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``.

    The special tokens take ids 0-3 in SPECIAL_TOKENS order. The result depends only on the
    texts and the arguments (the trainer breaks ties deterministically), so a fixed corpus seed
    gives a byte-identical tokenizer.json.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained ``tokenizers.Tokenizer`` as the ``transformers`` fast tokenizer that
    ``AutoTokenizer.from_pretrained`` (and so vLLM) reloads, with bos/eos/pad/unk set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(
    texts: Iterable[str], out_dir: Path | None = None, *, vocab_size: int = 2048
) -> PreTrainedTokenizerFast:
    """Train on ``texts``, wrap, and (when ``out_dir`` is given) save the tokenizer files
    (tokenizer.json, tokenizer_config.json, special tokens) into ``out_dir``."""
    hf_tokenizer = wrap(train_bpe(texts, vocab_size=vocab_size))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer
