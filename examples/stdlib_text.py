"""English text that ships with Python: training documents and held-out text.

Nothing is downloaded and nothing is imported to read it:

* training documents: the docstrings of the standard library's `.py` sources
  (read with `ast`; tests, `idlelib` and third-party packages left out);
* held-out text: the language reference topics of `pydoc_data.topics` (what
  `help("for")` prints), a different source, never trained on.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

#: Top-level parts of the stdlib that are tests, tools or not English prose.
_SKIP_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "pydoc_data", "lib2to3"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_PARTS or p.startswith("test_") for p in parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [
        doc
        for node in ast.walk(tree)
        if isinstance(node, kinds) and (doc := ast.get_docstring(node))
    ]


def _without_doctests(doc: str) -> str:
    """`doc` less its interactive examples (a `>>>` line and its output, up to a blank line)."""
    kept: list[str] = []
    in_example = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif not stripped:
            in_example = False
        if not in_example:
            kept.append(line)
    return "\n".join(kept).strip()


@functools.cache
def training_documents(min_chars: int = 200) -> tuple[str, ...]:
    """Docstrings of the stdlib sources without their doctests, the ones of at least
    `min_chars`, in a fixed order (parsed once per process: a few seconds)."""
    docs: list[str] = []
    for path in _source_files(stdlib_dir()):
        source = path.read_text(encoding="utf-8", errors="replace")
        cleaned = (_without_doctests(d) for d in _docstrings(source))
        docs.extend(d for d in cleaned if len(d) >= min_chars)
    return tuple(docs)


def held_out_text() -> str:
    """The language reference topics, in key order: text the trained model never saw."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))
