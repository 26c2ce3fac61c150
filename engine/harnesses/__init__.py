"""Built-in harness catalog: one data file per agent program (`<name>.yaml`, kind: Harness).

Called by `desired` when an agent names a built-in harness or a grove harness says
`builtin: NAME`. Returns the harness spec as plain data (checked against the schema).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from engine import schema
from engine.yamlio import Document, load_file

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


@functools.cache
def builtin(name: str) -> Document | None:
    """The built-in harness document `name`, or None when there is no such harness."""
    path = HERE / f"{name}.yaml"
    if name not in names():
        return None
    docs = load_file(path, f"builtin:{name}")
    problems = schema.check_document(docs[0])
    if problems:  # a broken package, not a user mistake
        raise RuntimeError(f"built-in harness {name} is invalid: {problems[0]}")
    return docs[0]


def spec(name: str) -> dict[str, Any] | None:
    doc = builtin(name)
    return dict(doc.data["spec"]) if doc else None
