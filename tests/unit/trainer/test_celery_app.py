"""The embedded broker (kombu's filesystem transport) keeps all its folders under LAMINA_HOME.

The send runs in a fresh process: kombu declares an exchange (and writes its control file)
once per process, so after another test has sent a task this one would see no control file
written at all, and could not tell where it would have gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SEND = """
import sys
from trainer.celery_app import TRAIN_TASK, make_celery
from trainer.contract.settings import LaminaSettings
make_celery(LaminaSettings(home=sys.argv[1], broker_url=None)).send_task(TRAIN_TASK, args=["job-x"])
"""


def test_the_folder_broker_writes_nothing_outside_home(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", SEND, str(home)], cwd=elsewhere, env=env, check=True, timeout=120)
    assert os.listdir(elsewhere) == []
    broker = home.resolve() / "broker"
    assert len(list((broker / "queue").iterdir())) == 1
    assert list((broker / "control").glob("*.exchange"))
