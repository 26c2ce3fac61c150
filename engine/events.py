"""The event log: one JSON object per line in `.engine/events.jsonl`, appended under a lock.

Called by `inbox` (every request's outcome), `watch` (passes, errors) and `executor`
callers. Lines are written whole with one write() on an O_APPEND descriptor and fsynced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine import paths
from engine.fsutil import flock
from engine.inventory import now


def path_for(root: Path) -> Path:
    return paths.state(root) / "events.jsonl"


def record(root: Path, event: dict[str, Any]) -> None:
    line = json.dumps({"time": now(), **event}, sort_keys=True) + "\n"
    path = path_for(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with flock(paths.state(root) / "locks" / "events.lock"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def read(root: Path) -> list[dict[str, Any]]:
    path = path_for(root)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
