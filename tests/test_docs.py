"""The repository stands on its own: every Markdown file it names is in it, and nothing points outside.

A reference is any ``name.md`` in code, comments, docstrings, docs, configs and scripts. It resolves when
the path exists relative to the repository's root or to the referring file's folder; a bare file name
(``"docs" / "deploy.md"`` in Python builds its folder separately) also resolves when a file of that
name exists anywhere in the repository. Files the tools write (``arcsim report``'s ``report.md``, the
benchmarks' ``--markdown OUT.md``) are outputs, not references.

Measured figures go stale in code, so module docstrings hold none; they live in docs/benchmarks.md
beside the command that measured them.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent

# What git ignores (.gitignore) plus git's own folder: not part of the repository.
SKIPPED_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "build",
        "dist",
        "runs",
        "wheelhouse",
        "__pycache__",
        ".pytest_cache",
        ".hypothesis",
        ".mypy_cache",
        ".ruff_cache",
        ".import_linter_cache",
        ".whl",
        ".gl",
    }
)
SKIPPED_TOP_DIRS = frozenset({"data"})  # /data/ in .gitignore: downloaded datasets
SCANNED_SUFFIXES = frozenset({".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".proto", ".cfg", ".ini", ".txt"})
SCANNED_NAMES = frozenset({"Makefile", "Dockerfile", "run"})  # run: .ci/run

MD_REFERENCE = re.compile(r"(?<![\w./-])([\w./-]*[\w-]\.md)(?![\w])")
OUTPUT_FLAG = re.compile(r"--markdown[ =]$")
GENERATED = frozenset({"report.md"})  # written by `arcsim report DIR` into DIR
# Split so that this file does not name the folder it forbids.
OUTSIDE = ".." + "/shared"

MEASURED = re.compile(
    r"\d[\d,.]*\s*(?:[kMG]B/s|ms|µs|us)\b|\d+(?:\.\d+)?x (?:faster|slower)|times (?:faster|slower)", re.IGNORECASE
)


def repository_files() -> Iterator[Path]:
    """Every scanned text file of the working tree, outside what .gitignore leaves out."""
    for folder, dirs, files in os.walk(REPO):
        top = Path(folder) == REPO
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not (top and d in SKIPPED_TOP_DIRS)
        )
        for name in sorted(files):
            path = Path(folder, name)
            # This file's own examples name missing documents on purpose.
            if (path.suffix in SCANNED_SUFFIXES or name in SCANNED_NAMES) and path != THIS_FILE:
                yield path


def unresolved_references(path: Path, text: str, names: frozenset[str]) -> Iterator[str]:
    """``file:line: reference`` for each ``.md`` reference in ``text`` that names no file here."""
    for match in MD_REFERENCE.finditer(text):
        reference = match.group(1)
        line_start = text.rfind("\n", 0, match.start()) + 1
        token_start = max(text.rfind(" ", 0, match.start()), text.rfind("(", 0, match.start())) + 1
        if "://" in text[token_start : match.end()] or OUTPUT_FLAG.search(text[line_start : match.start()]):
            continue  # a URL, or the file a benchmark command writes
        basename = reference.rsplit("/", 1)[-1].lstrip(".")
        if basename in GENERATED:
            continue
        candidates = (REPO / reference, path.parent / reference)
        if any(candidate.is_file() for candidate in candidates) or ("/" not in reference and reference in names):
            continue
        line = text.count("\n", 0, match.start()) + 1
        yield f"{path.relative_to(REPO)}:{line}: {reference}"


def test_every_markdown_reference_resolves_to_a_file_of_the_repository() -> None:
    # Prepare
    files = list(repository_files())
    names = frozenset(path.name for path in files)
    # Execute
    unresolved = [
        problem
        for path in files
        for problem in unresolved_references(path, path.read_text(encoding="utf-8", errors="replace"), names)
    ]
    # Assert
    assert unresolved == []


def test_nothing_points_at_the_folder_outside_the_repository() -> None:
    # Execute
    mentions = [
        f"{path.relative_to(REPO)}:{number}"
        for path in repository_files()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
        if OUTSIDE in line
    ]
    # Assert
    assert mentions == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    # Prepare: a file in the repository's folder layout naming a missing document, a present one, a URL,
    # a benchmark's output and the report arcsim writes
    names = frozenset({"paper.md"})
    source = REPO / "docs" / "example.md"
    text = (
        "See MISSING_DESIGN.md and paper.md and [results](results.md) and docs/paper.md\n"
        "and https://example.org/NOTES.md, then `benchmarks/robust.py --markdown /tmp/tables.md` and DIR/report.md\n"
    )
    # Execute
    unresolved = list(unresolved_references(source, text, names))
    # Assert
    assert unresolved == ["docs/example.md:1: MISSING_DESIGN.md"]
    assert MEASURED.search("decodes at ~3,000 MB/s") and MEASURED.search("2 to 5 times faster")
    assert not MEASURED.search("a round of the default config, 13 vectors of 431,080 floats")


def test_module_docstrings_hold_no_measured_figures() -> None:
    # Prepare
    modules = sorted((REPO / "arcsim").rglob("*.py"))
    # Execute
    found = []
    for path in modules:
        if "v1" in path.relative_to(REPO).parts:
            continue  # generated protobuf stubs
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in MEASURED.finditer(docstring)]
    # Assert: they belong in docs/benchmarks.md, with the command that measured them
    assert found == []
