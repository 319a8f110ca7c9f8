"""LAMINA_LOG_FORMAT=json: one JSON object per line with request id, job id, model and version;
LAMINA_DEVICE: where the worker trains (only the CPU path and the selection logic run here)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
import torch

from trainer import loop
from trainer.contract.logs import JsonFormatter, configure_logging, log_context
from trainer.contract.settings import LaminaSettings


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("json")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_context_fields(captured: io.StringIO) -> None:
    log = logging.getLogger("lamina.test")
    with log_context(job_id="job-1", model="zorblat", request_id="req-9"):
        log.info("published %s", "zorblat/v1", extra={"version": "zorblat/v1"})
    log.warning("outside")
    inside, outside = lines(captured)
    assert inside["message"] == "published zorblat/v1"
    assert inside["level"] == "INFO" and inside["logger"] == "lamina.test"
    assert (inside["job_id"], inside["model"], inside["version"], inside["request_id"]) == (
        "job-1",
        "zorblat",
        "zorblat/v1",
        "req-9",
    )
    assert "ts" in inside
    assert not {"job_id", "model", "version", "request_id"} & set(outside)


def test_exceptions_stay_inside_one_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("lamina.test").exception("failed")
    (entry,) = lines(captured)
    assert "ValueError: boom" in entry["exc_info"]


def test_the_formatter_leaves_out_the_no_request_marker() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hi", None, None)
    record.request_id = "-"
    assert "request_id" not in json.loads(JsonFormatter().format(record))


def test_log_format_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert LaminaSettings(home=tmp_path).log_format == "text"
    monkeypatch.setenv("LAMINA_LOG_FORMAT", "json")
    assert LaminaSettings(home=tmp_path).log_format == "json"
    monkeypatch.setenv("LAMINA_LOG_FORMAT", "xml")
    with pytest.raises(pydantic.ValidationError):
        LaminaSettings(home=tmp_path)


def test_device_selection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.select_device("auto") == torch.device("cpu")
    assert loop.select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LAMINA_DEVICE=cuda"):
        loop.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.select_device("auto") == torch.device("cuda")
    assert loop.select_device("cuda:1") == torch.device("cuda:1")
    assert LaminaSettings(home=tmp_path).device == "auto"
    with pytest.raises(pydantic.ValidationError):
        LaminaSettings(home=tmp_path, device="tpu")


def test_load_base_puts_the_model_on_the_device(base_model_dir: Path) -> None:
    model, _ = loop.load_base(base_model_dir, loop.select_device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
