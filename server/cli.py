"""The ``lamina`` command line: ``serve`` runs the API server; later commands run the worker,
the demo and the benchmarks. Heavy imports happen inside each command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Lamina: an LLM server that keeps learning.", no_args_is_help=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (LAMINA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (LAMINA_PORT).")] = None,
    model: Annotated[Path | None, typer.Option(help="Base model directory (LAMINA_MODEL).")] = None,
) -> None:
    """Run the OpenAI-compatible server on the vLLM engine until Ctrl-C."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None}
    settings = ServerSettings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
