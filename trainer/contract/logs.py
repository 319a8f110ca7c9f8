"""One log configuration for the server and the worker (the formats live in :mod:`trainer.logs`)."""

from __future__ import annotations

import logging
import os
from typing import Literal

from trainer.logs import configure_logging, log_context, set_log_context

__all__ = ["configure_logging", "log_context", "set_log_context", "use_log_format"]


def use_log_format(log_format: Literal["text", "json"]) -> None:
    """Switch to the settings' log format, keeping the level already chosen (``--verbose``). In
    JSON, vLLM and uvicorn log through the root logger too, instead of their own text handlers."""
    if log_format == "json":
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    configure_logging(log_format, logging.getLogger().level)
