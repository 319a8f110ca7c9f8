"""The method a task that names none gets: chosen to fit how `continual` is served."""

from __future__ import annotations

import pytest

from server.settings import ServerSettings
from trainer.config import resolve_method


@pytest.mark.parametrize(
    ("routing", "expected"),
    [("task", "own-lora"), ("merge", "inflora"), ("off", "inflora")],
)
def test_auto_picks_the_method_whose_served_model_keeps_the_tasks(routing: str, expected: str) -> None:
    """Under task routing each task's own model answers its prompts (own-lora's are the best);
    under merge and off routing the merge does (inflora's keeps every task)."""
    settings = ServerSettings(continual_routing=routing)  # type: ignore[arg-type]
    assert settings.default_method == "auto" and settings.fallback_method == expected
    assert resolve_method(settings.fallback_method).name == expected


def test_a_method_set_by_the_operator_is_kept() -> None:
    assert ServerSettings(default_method="lori-s", continual_routing="off").fallback_method == "lori-s"
