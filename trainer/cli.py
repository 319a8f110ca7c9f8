"""The training worker's command line: ``lamina-worker``, also mounted as ``lamina worker`` through
the ``lamina.commands`` entry points (pyproject.toml), so the server's CLI need not import it.
Heavy imports (Celery's worker, the training code) happen once the settings have been read."""

from __future__ import annotations

import logging
from typing import Annotated

import typer


def worker(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the training worker (Celery; concurrency 1, acks_late, prefetch 1)."""
    from pydantic import ValidationError

    from trainer.contract.logs import use_log_format
    from trainer.contract.settings import LaminaSettings, setting_error

    try:
        checked = LaminaSettings()
    except ValidationError as error:  # one line naming the variable, as the `lamina` commands do
        typer.echo(f"lamina: {setting_error(error)}", err=True)
        raise typer.Exit(2) from None
    from trainer.contract.backends import database_problem

    if problem := database_problem(checked):
        typer.echo(f"lamina: {problem}", err=True)
        raise typer.Exit(2)
    use_log_format(checked.log_format)  # the worker module reads the settings again at import
    from trainer.worker import celery, settings

    celery.worker_main(
        [
            "worker",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "-Q",
            settings.queue,
            f"--loglevel={loglevel}",
            "--hostname=lamina@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def main() -> None:
    """``lamina-worker``: the worker on its own, with the log format ``lamina`` would set up."""
    from trainer.contract.logs import configure_logging

    configure_logging("text", logging.INFO)
    typer.run(worker)
