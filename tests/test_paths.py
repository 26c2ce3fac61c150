"""One home for the engine's layout: `.engine/` paths and agent branch names are made by
engine.paths only. A path join onto a literal ".engine" or an f-string branch name
anywhere else in the package fails here."""

from __future__ import annotations

import re
from pathlib import Path

from engine import paths

PACKAGE = Path(__file__).resolve().parent.parent / "engine"
JOIN = re.compile(r'/ "\.engine"|"\.engine" /|frozenset\(\{[^}]*"\.engine"')
BRANCH = re.compile(r'f"engine/\{')


def test_only_engine_paths_spells_the_layout() -> None:
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "paths.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if JOIN.search(line) or BRANCH.search(line):
                offenders.append(f"{f.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert offenders == []


def test_branch_names_round_trip() -> None:
    assert paths.branch("demo", "coder") == "engine/demo/coder"
    assert paths.agent_of_branch("engine/demo/coder") == ("demo", "coder")
    for bad in ("engine/demo", "main", "engine//x", "other/demo/coder", "engine/a/b/c"):
        assert paths.agent_of_branch(bad) is None
    root = Path("/r")
    assert paths.inbox(root, "g", "a") == Path("/r/.engine/inbox/g/a")
    assert paths.log_file(root, "g", "a") == Path("/r/.engine/logs/g/a.log")
