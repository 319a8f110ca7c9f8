"""The model catalogue: install (convert a GGUF into a Hugging Face directory), verify, resolve
``LAMINA_MODEL`` names. Nothing here downloads: every install gets a tiny GGUF this file writes
with the ``gguf`` package (a 2-layer Llama with a byte-level BPE vocabulary of 36 tokens)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from trainer.base_model import catalog
from trainer.base_model.catalog import (
    CATALOG,
    MANIFEST_NAME,
    ModelNotInstalledError,
    install_model,
    resolve_model,
    verify_model,
)
from trainer.contract.settings import LaminaSettings, default_base_model_dir

NAME = "smollm2-135m-instruct"
ENTRY = CATALOG[NAME]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A float32 Llama GGUF shaped like llama.cpp's: metadata keys, tensor names, gpt2 tokenizer."""
    rng = np.random.default_rng(seed)
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]  # Ġ: a space, byte-level
    merges = ["h e", "l l", "Ġ t", "he ll"]
    tokens = specials + alphabet + [merge.replace(" ", "") for merge in merges]
    hidden, heads, kv_heads, ffn, layers = 32, 4, 2, 64, 2
    kv_dim = kv_heads * hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))  # no output.weight: tied
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    for i in range(layers):
        for name, shape in {
            "attn_norm": (hidden,),
            "ffn_norm": (hidden,),
            "attn_q": (hidden, hidden),
            "attn_k": (kv_dim, hidden),
            "attn_v": (kv_dim, hidden),
            "attn_output": (hidden, hidden),
            "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden),
            "ffn_down": (hidden, ffn),
        }.items():
            tensor = weight(*shape)
            writer.add_tensor(
                f"blk.{i}.{name}.weight", tensor + 1 if len(shape) == 1 else tensor
            )  # norms ≈ 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any path that would reach PyPI or a pip-installed package fails the test instead."""

    def refuse(*_: object) -> Path:
        raise AssertionError("a test tried to download a model")

    monkeypatch.setattr(catalog, "_pip_download", refuse)
    monkeypatch.setattr(catalog, "packaged_gguf", lambda _entry: None)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> tuple[Path, Path]:
    """(home, model dir): one conversion shared by the tests that only read the result."""
    home = tmp_path_factory.mktemp("home")
    return home, install_model(NAME, home, source=tiny_gguf, progress=False, echo=lambda _: None)


def test_install_converts_into_home_with_a_manifest(installed: tuple[Path, Path], tiny_gguf: Path) -> None:
    home, path = installed
    assert path == home / "models" / NAME
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["source"]["package"] == ENTRY.package
    assert manifest["source"]["version"] == ENTRY.version
    assert manifest["source"]["gguf"] == ENTRY.gguf_member
    assert manifest["source"]["gguf_sha256"] == catalog.file_sha256(tiny_gguf)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(
        manifest["files"]
    )
    assert verify_model(path) == []
    assert [p.name for p in (home / "models").iterdir()] == [NAME]  # no staging directory left behind
    assert [p.name for p in (home / "downloads").iterdir()] == []


def test_converted_model_matches_the_gguf_model(installed: tuple[Path, Path], tiny_gguf: Path) -> None:
    _, path = installed
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    assert converted.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello the"}], tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, -1].item() == 2  # the chat template survived and <|im_end|> stays one token
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_second_install_is_a_no_op(installed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    home, path = installed
    monkeypatch.setattr(catalog, "_convert", lambda _: pytest.fail("converted again"))
    said: list[str] = []
    assert install_model(NAME, home, progress=False, echo=said.append) == path
    assert "already installed" in said[0]


def test_a_damaged_copy_is_detected_and_reinstalled(tmp_path: Path, tiny_gguf: Path) -> None:
    path = install_model(NAME, tmp_path, source=tiny_gguf, progress=False, echo=lambda _: None)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (path / "tokenizer.json").unlink()
    assert verify_model(path) == [
        "model.safetensors: sha256 differs from the manifest",
        "tokenizer.json: missing",
    ]

    said: list[str] = []
    assert install_model(NAME, tmp_path, source=tiny_gguf, progress=False, echo=said.append) == path
    assert "reinstalling" in said[0]
    assert verify_model(path) == []
    assert [p.name for p in (tmp_path / "models").iterdir()] == [NAME]


def test_verify_reports_a_missing_manifest(tmp_path: Path) -> None:
    [problem] = verify_model(tmp_path)
    assert problem.startswith(f"{MANIFEST_NAME}: unreadable")


def test_install_reads_the_gguf_out_of_a_wheel(tmp_path: Path, tiny_gguf: Path) -> None:
    wheel = tmp_path / f"{ENTRY.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf, ENTRY.gguf_member)
    path = install_model(NAME, tmp_path / "home", source=wheel, progress=False, echo=lambda _: None)
    assert verify_model(path) == []
    assert json.loads((path / MANIFEST_NAME).read_text())["source"]["origin"] == str(wheel)


def test_a_downloaded_wheel_with_another_gguf_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    """Without an explicit source the GGUF must match the catalogue's pinned sha256."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / f"{ENTRY.wheel_prefix}py3-none-any.whl", "w") as archive:
        archive.write(tiny_gguf, ENTRY.gguf_member)
    with pytest.raises(RuntimeError, match="not the catalogue's"):
        install_model(NAME, tmp_path, progress=False, echo=lambda _: None)
    assert not (tmp_path / "models" / NAME).exists()


def test_resolve_model(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    home, path = installed
    assert resolve_model(NAME, home) == path
    assert resolve_model(tmp_path, home) == tmp_path  # a directory as is
    assert resolve_model("no/such/dir", home) == Path("no/such/dir")  # the loader's to judge
    with pytest.raises(ModelNotInstalledError, match=f"lamina model install {NAME}"):
        resolve_model(NAME, tmp_path)


def test_settings_resolve_an_installed_name(
    installed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, path = installed
    monkeypatch.setenv("LAMINA_MODEL", NAME)
    monkeypatch.setenv("LAMINA_HOME", str(home))
    assert LaminaSettings().model == path


def test_settings_default_is_still_the_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMINA_MODEL", raising=False)
    assert LaminaSettings().model == default_base_model_dir()


def test_settings_refuse_an_uninstalled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_MODEL", NAME)
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path))
    with pytest.raises(ValidationError) as error:
        LaminaSettings()
    message = error.value.errors()[0]["msg"]
    assert f"LAMINA_MODEL={NAME}" in message
    assert f"run `lamina model install {NAME}`" in message
    assert "\n" not in message


def test_cli_install_and_list(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import app

    monkeypatch.setenv("LAMINA_HOME", str(tmp_path))
    monkeypatch.setenv("LAMINA_MODEL", NAME)  # not installed yet: install must not need it valid
    runner = CliRunner()
    listed = runner.invoke(app, ["model", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"{NAME}  " in listed.output and "not installed" in listed.output

    result = runner.invoke(app, ["model", "install", NAME, "--from", str(tiny_gguf)])
    assert result.exit_code == 0, result.output
    assert f"installed {NAME} at {tmp_path / 'models' / NAME}" in result.output
    again = runner.invoke(app, ["model", "install", NAME, "--from", str(tiny_gguf)])
    assert "already installed" in again.output
    assert f"installed at {tmp_path / 'models' / NAME}" in runner.invoke(app, ["model", "list"]).output

    unknown = runner.invoke(app, ["model", "install", "no-such-model"])
    assert unknown.exit_code != 0
