"""MkDocs hook: the repository files outside ``docs/`` that a page links to become part of the site.

A page links to a file of the repository by its path relative to the page, as GitHub resolves it
(``../bench/results/continual-order1.png`` from ``docs/results.md``), so the same Markdown reads
right on GitHub and in the site. MkDocs itself only knows the files under ``docs/`` and, in strict
mode, refuses such a link; this hook adds each target that exists inside the repository as a static
file of the site, under ``repo/``, so the link resolves and the file is copied. A target that does
not exist is left alone, and the strict build reports it. Markdown files outside ``docs/`` are not
added (MkDocs would render them as pages, with links of their own to resolve): name them in code.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

# an inline link or image whose target leaves docs/: ](../path) or ](../path#anchor)
LINK = re.compile(r"\]\((\.\./[^)\s#]+)")


def on_files(files: Files, config: Any) -> Files:
    docs = Path(config.docs_dir).resolve()
    repo = Path(config.config_file_path).resolve().parent
    for page in sorted(docs.rglob("*.md")):
        folder = posixpath.dirname(page.relative_to(docs).as_posix())
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            src_uri = posixpath.normpath(posixpath.join(folder, target))  # how MkDocs resolves it
            path = (docs / src_uri).resolve()
            if src_uri.endswith(".md") or files.get_file_from_path(src_uri) is not None:
                continue
            if not path.is_file() or repo not in path.parents:
                continue
            files.append(
                File(
                    src_uri,
                    src_dir=str(docs),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                    dest_uri="repo/" + path.relative_to(repo).as_posix(),
                    inclusion=InclusionLevel.INCLUDED,
                )
            )
    return files
