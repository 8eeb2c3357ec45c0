"""Field documentation, read from the string under each field in `schema.py`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from megagpt.config import schema


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written under it."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def describe_fields(cls: type = schema.Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (dotted key, type, default, doc) for every leaf field under `cls`."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe_fields(hint, f"{prefix}{f.name}."))
            continue
        type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        rows.append(
            (f"{prefix}{f.name}", type_name, repr(getattr(defaults, f.name)), docs.get(f.name, ""))
        )
    return rows


def format_fields() -> str:
    lines = []
    for key, type_name, default, doc in describe_fields():
        lines.append(f"{key}  ({type_name}, default {default})")
        lines.extend(f"    {line}" for line in doc.splitlines())
    return "\n".join(lines)
