"""The settings every Lamina process agrees on (:class:`LaminaSettings`, defined in
:mod:`trainer.settings`; the server's own settings extend it), and how a bad ``LAMINA_*`` value
reads on a command line."""

from __future__ import annotations

from pydantic import ValidationError

from trainer.settings import VLLM_LORA_RANKS, LaminaSettings

__all__ = ["VLLM_LORA_RANKS", "LaminaSettings", "setting_error"]


def setting_error(error: ValidationError) -> str:
    """The first problem as one line: ``LAMINA_MAX_LORA_RANK: max_lora_rank must be one of ...``.
    Both the ``lamina`` commands and ``lamina-worker`` end with it, so a setting reads the same."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a check of the whole object names its variables itself
        return message
    return f"LAMINA_{str(first['loc'][0]).upper()}: {message}"
