"""The documentation holds together: the site builds in MkDocs's strict mode (a link to a page or a
heading that does not exist is an error), every relative link of ``README.md`` and of the
benchmarks' READMEs reaches a file (and, with an anchor, a heading of it), and every document the
code names is a file of this repository."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "mkdocs.yml"
# Where the code may name a document (the packages, the benchmarks, the tests).
CODE_DIRS = ("server", "trainer", "adapters_store", "bench", "tests")
CODE_SUFFIXES = {".py", ".sh", ".js", ".html", ".md", ".toml", ".yaml", ".yml", ".cfg", ".txt"}
# Documents that live outside the repository: nothing in it may send a reader there.
OUTSIDE = ("DESIGN" + ".md", "STYLE" + ".md")
SKIP_DIRS = {".git", ".venv", "site", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "var"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path to a document: a README.md anywhere, or a page under docs/.
DOC_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*(?:README\.md|docs/[\w.-]+\.md))")
BARE_README = re.compile(r"\bREADME\b(?!\.md)")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0
    build = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    return subprocess.run(
        [*build, "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def problems_of(build: subprocess.CompletedProcess[str]) -> str:
    lines = (build.stdout + build.stderr).splitlines()
    return "\n".join(line for line in lines if "WARNING" in line or "ERROR" in line or "Error" in line)


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    build = mkdocs_build(CONFIG, tmp_path / "site")
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{problems_of(build) or build.stderr}"
    for page in ("methods", "api", "operations", "results", "architecture", "contributing"):
        assert (tmp_path / "site" / page / "index.html").is_file(), f"docs/{page}.md was not built"
    # docs/hooks/repo_files.py copied the plot docs/results.md shows from bench/results/
    assert (tmp_path / "site" / "repo" / "bench" / "results" / "continual-order1.png").is_file()


def test_the_strict_build_refuses_a_missing_anchor_page_or_file(tmp_path: Path) -> None:
    """The same configuration on pages with broken links: each is reported and fails the build."""
    shutil.copy(CONFIG, tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs" / "hooks", tmp_path / "docs" / "hooks")
    for page in ("index", "methods", "api", "operations", "results", "architecture", "contributing"):
        (tmp_path / "docs" / f"{page}.md").write_text(f"# {page}\n\n## A heading\n")
    (tmp_path / "docs" / "index.md").write_text(
        "# Home\n\n[anchor](methods.md#no-such-heading) [page](no-such-page.md) "
        "[here](#a-heading-not-here) ![file](../no/such/plot.png)\n"
    )
    build = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = build.stdout + build.stderr
    assert build.returncode != 0, output
    for broken in ("#no-such-heading", "no-such-page.md", "#a-heading-not-here", "../no/such/plot.png"):
        assert broken in output, f"the strict build did not report {broken!r}:\n{output}"


@functools.cache
def markdown_settings() -> tuple[list[object], dict[str, object]]:
    """The Markdown extensions the site renders with (so anchors are the site's, GitHub's too)."""
    from mkdocs.config import load_config

    config = load_config(str(CONFIG))
    return list(config["markdown_extensions"]), dict(config["mdx_configs"])


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """The heading anchors of a Markdown file, as the site (and GitHub) make them."""
    import markdown

    extensions, configs = markdown_settings()
    md = markdown.Markdown(extensions=extensions, extension_configs=configs)  # type: ignore[arg-type]
    md.convert(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    todo = list(md.toc_tokens)  # type: ignore[attr-defined]
    while todo:
        token = todo.pop()
        found.add(token["id"])
        todo += token["children"]
    return frozenset(found)


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of each link and image of a Markdown file that is not a URL, outside code."""
    text = path.read_text(encoding="utf-8")
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield text.count("\n", 0, match.start()) + 1, target


def broken_link(source: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``source``) leads nowhere, or None when it resolves."""
    path_part, _, anchor = target.partition("#")
    path = (source.parent / path_part).resolve() if path_part else source
    if not path.exists():
        return "no such file"
    if ROOT not in path.parents and path != ROOT:
        return "outside the repository"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"{path.relative_to(ROOT)} has no heading with anchor #{anchor}"
    return None


def readmes() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "bench").rglob("README.md"))]


def test_every_relative_link_of_the_readmes_resolves() -> None:
    problems = []
    for source in readmes():
        for line, target in relative_links(source):
            reason = broken_link(source, target)
            if reason:
                problems.append(f"{source.relative_to(ROOT)}:{line}: link {target!r}: {reason}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def text_files(folders: tuple[str, ...] | None = None) -> Iterator[Path]:
    """The repository's text files (or those under ``folders``), without what is built or ignored."""
    tops = [ROOT / folder for folder in folders] if folders else [ROOT]
    for top in tops:
        for path in sorted(top.rglob("*")):
            parts = set(path.relative_to(ROOT).parts)
            if path.is_file() and not parts & SKIP_DIRS and not any(p.endswith(".egg-info") for p in parts):
                yield path


def test_every_document_the_code_names_is_in_the_repository() -> None:
    """A comment or docstring that sends the reader to a document names a file that exists: a
    ``README.md`` (at the root or a benchmark's) or a ``docs/<page>.md``, not "the README"."""
    problems = []
    for path in text_files(CODE_DIRS):
        if path.suffix not in CODE_SUFFIXES or path == Path(__file__).resolve():
            continue
        if path.parent == ROOT / "bench" / "results":  # benchmark outputs, not code
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for name in DOC_PATH.findall(line):
                if not ((ROOT / name).is_file() or (path.parent / name).is_file()):
                    problems.append(f"{where}: names {name!r}, which is not a file of the repository")
            if BARE_README.search(line):
                problems.append(
                    f"{where}: says 'README' without naming the file: write README.md, or the "
                    "docs/<page>.md that holds the section"
                )
    assert not problems, "references to documents that do not resolve:\n" + "\n".join(problems)


def test_nothing_sends_the_reader_outside_the_repository() -> None:
    problems = []
    for path in text_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # not a text file
        for name in OUTSIDE:
            if name in text:
                problems.append(f"{path.relative_to(ROOT)}: names {name}, which is not in this repository")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("docs/api.md", None),
        ("docs/api.md#tasks-api", None),
        ("docs/api.md#no-such-heading", "docs/api.md has no heading with anchor #no-such-heading"),
        ("docs/no-such-page.md", "no such file"),
    ],
)
def test_the_link_check_itself(target: str, reason: str | None) -> None:
    assert broken_link(ROOT / "README.md", target) == reason
