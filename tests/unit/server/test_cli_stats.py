"""``lamina stats`` prints the admin view's figures from the store as tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.store import AdapterStore
from server.cli import app


def _adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g), scale=1.0)
    return LoraAdapter({"model.layers.0.self_attn.q_proj": module})


def test_stats_prints_tasks_and_collision_matrix(
    base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store", fingerprint_model(base_model_dir))
    checked = {  # as the worker records it
        "evaluation": {
            "examples": [],
            "row": {"alpha": 97.5, "beta": 88.25},
            "general": {"agreement": 96.25, "n": 131},
        }
    }
    store.publish("alpha", _adapter(0), {"method": "inc-lora"}, merge="concat")
    store.publish("beta", _adapter(1), {"method": "inc-lora", **checked}, merge="concat")
    monkeypatch.setenv("LAMINA_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LAMINA_MODEL", str(base_model_dir))
    picture = tmp_path / "stats.png"
    result = CliRunner().invoke(app, ["stats", "--png", str(picture)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "alpha/v1" in result.output and "beta/v1" in result.output
    assert "Collision rate" in result.output and "live merge m2" in result.output
    assert "Accuracy matrix" in result.output and "97.5" in result.output and "88.25" in result.output
    assert "base (general)" in result.output and "96.25" in result.output
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_stats_refuses_a_path_that_is_not_a_store_and_creates_nothing(
    base_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not a store")
    for path in (tmp_path, tmp_path / "missing"):
        env = {"LAMINA_STORE": str(path), "LAMINA_MODEL": str(base_model_dir), "LAMINA_HOME": str(tmp_path)}
        result = CliRunner().invoke(app, ["stats"], env=env)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.strip() == (
            f"lamina: {path} is not an adapter store (no store.json); set LAMINA_STORE or LAMINA_HOME"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
