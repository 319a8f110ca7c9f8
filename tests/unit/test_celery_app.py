"""The embedded broker (kombu's filesystem transport) keeps all its folders under LAMINA_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.celery_app import TRAIN_TASK, make_celery
from trainer.contract.settings import LaminaSettings


def test_the_folder_broker_writes_nothing_outside_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    app = make_celery(LaminaSettings(home=home, broker_url=None))
    app.send_task(TRAIN_TASK, args=["job-x"])
    assert os.listdir(elsewhere) == []
    broker = home.resolve() / "broker"
    assert len(list((broker / "queue").iterdir())) == 1
    assert list((broker / "control").glob("*.exchange"))
