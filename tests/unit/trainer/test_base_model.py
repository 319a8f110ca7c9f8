"""The tiny base model: corpus, tokenizer, reproducible build, loading, pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.base_model.build import BUILD_INFO_FILE, build_base_model, init_model, model_config
from trainer.base_model.corpus import COUNTRY_CAPITALS, generate_documents, plural
from trainer.base_model.pretrain import PretrainConfig, batch_loss, learning_rate, pack_documents, pretrain
from trainer.base_model.tokenizer import build_tokenizer

# Small settings keep every test here well under a second or two.
SMALL = {"vocab_size": 400, "tokenizer_docs": 300}


@pytest.fixture(scope="module")
def small_tokenizer():
    return build_tokenizer(generate_documents(0, 300), vocab_size=400)


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("m") / "tiny", seed=0, **SMALL)


def test_corpus_is_deterministic_and_varied() -> None:
    docs = generate_documents(3, 200)
    assert docs == generate_documents(3, 200)
    assert docs != generate_documents(4, 200)
    text = "\n".join(docs)
    for marker in ("Q: ", " + ", "This text is about", "spelled backwards", "The opposite of"):
        assert marker in text


def test_plural_rule_and_places_table() -> None:
    assert [plural(w) for w in ("cat", "box", "city", "day", "church")] == [
        "cats",
        "boxes",
        "cities",
        "days",
        "churches",
    ]
    assert len(COUNTRY_CAPITALS) == len(set(COUNTRY_CAPITALS.values())) == 48


def test_tokenizer_round_trips_and_adds_bos(small_tokenizer, tmp_path: Path) -> None:
    texts = ["The weather is sunny.", "12 + 7 = 19", "reverse: cat -> tac", 'héllo, 世界! {"a": 1}']
    for text in texts:
        ids = small_tokenizer(text)["input_ids"]
        assert ids[0] == small_tokenizer.bos_token_id
        assert small_tokenizer.decode(ids, skip_special_tokens=True) == text
    small_tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert [reloaded(t)["input_ids"] for t in texts] == [small_tokenizer(t)["input_ids"] for t in texts]


def test_tokenizer_is_deterministic() -> None:
    docs = generate_documents(0, 300)
    first = build_tokenizer(docs, vocab_size=400).backend_tokenizer.to_str()
    assert first == build_tokenizer(docs, vocab_size=400).backend_tokenizer.to_str()


def test_build_is_byte_reproducible_from_seed(built_dir: Path, tmp_path: Path) -> None:
    again = build_base_model(tmp_path / "again", seed=0, **SMALL)
    other = build_base_model(tmp_path / "other", seed=1, **SMALL)
    weights = (built_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_built_dir_loads_and_gives_logits(built_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(built_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(built_dir))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert config.hidden_size // config.num_attention_heads == 64  # a head size vLLM's CPU kernels take
    assert not config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer) == 400
    batch = tokenizer(["The weather", "Q: What is 2 plus 3? A:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 400)
    assert torch.isfinite(logits).all()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (built_dir / name).is_file()


def test_learning_rate_warms_up_then_decays() -> None:
    config = PretrainConfig(steps=100, warmup_steps=10, peak_lr=1e-3, min_lr_ratio=0.1)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] < rates[9] == pytest.approx(1e-3)
    assert rates[10] > rates[50] > rates[99] >= 1e-4 - 1e-12


def test_pretraining_lowers_loss_on_fixed_batch(small_tokenizer) -> None:
    torch.manual_seed(0)
    model = init_model(model_config(small_tokenizer), seed=0)
    blocks = pack_documents(small_tokenizer, generate_documents(1, 60), seq_len=32)[:4]
    with torch.no_grad():
        before = batch_loss(model, blocks).item()
    config = PretrainConfig(steps=8, batch_size=4, seq_len=32, peak_lr=2e-3, warmup_steps=2)
    losses = pretrain(model, blocks, config, progress=False)
    with torch.no_grad():
        after = batch_loss(model, blocks).item()
    assert len(losses) == 8
    assert after < before - 0.5


def test_build_with_pretraining_records_losses(tmp_path: Path) -> None:
    config = PretrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=1)
    out = build_base_model(
        tmp_path / "pt", seed=0, pretrain_steps=3, pretrain_config=config, progress=False, **SMALL
    )
    info = json.loads((out / BUILD_INFO_FILE).read_text())
    assert info["pretrain"]["steps"] == 3
    assert info["loss_first"] > 0
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 400
