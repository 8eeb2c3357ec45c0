"""An English corpus that every Python installation carries: its documentation.

Two sources, both read from the running interpreter's own files (no network):
the reference-manual topics behind `help()` (pydoc_data.topics), and the docstrings
of the standard library's modules, classes and functions, read with `ast` so that
nothing is imported.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "site-packages",
    "ensurepip",
    "config-3.10-x86_64-linux-gnu",
}
MIN_DOCSTRING_CHARS = 200


def pydoc_topics() -> Iterator[str]:
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name].strip()


def stdlib_docstrings(min_chars: int = MIN_DOCSTRING_CHARS) -> Iterator[str]:
    """Docstrings of at least `min_chars` characters, in a fixed (sorted) order."""
    library = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(library.rglob("*.py")):
        if _SKIP_PARTS & set(path.relative_to(library).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc.strip()


def python_documentation() -> list[str]:
    """All documents, topics first; about 1.6 MB of text on CPython 3.11."""
    return list(pydoc_topics()) + list(stdlib_docstrings())
