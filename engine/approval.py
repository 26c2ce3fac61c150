"""Spawn approval by a person: the decisions file `.engine/state/<grove>.approvals.json`.

Called by `ingest` (is a spawn request approved, denied or still waiting; announcing a
waiting one once), by `engine approve` / `engine deny` (recording a decision) and by
`writeback` (the `Spawn-Approved-By` trailers of a write-back commit). Host-only state,
out of every agent's reach. Read without a lock (the file is only ever replaced whole);
changed only inside `update`, under a flock, and written atomically.

Entries are keyed `<parent>/<request id>` (a request id is its agent's own). A decision
binds to the exact child that was judged: `digest` of its document, the time it was judged
aside. A request rewritten after its approval has another digest, so the approval does
not carry over and the request waits again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import paths
from engine.errors import EngineError
from engine.fsutil import atomic_write, flock

APPROVED, DENIED = "approved", "denied"
MAX_BYTES = 16 * 1024 * 1024  # a decisions file larger than this is not read


@dataclass(frozen=True)
class Entry:
    """What is known about one spawn request that needs (or needed) a person."""

    decision: str = ""  # APPROVED, DENIED, or "" (waiting)
    by: str = ""  # who decided
    at: str = ""  # when (UTC, as inventory.now)
    reason: str = ""  # why (a denial's --reason)
    child: str = ""  # the child's name
    digest: str = ""  # of the child judged when it was decided (`digest`)
    announced: bool = False  # SpawnPendingApproval was recorded for it
    seen: str = ""  # digest of the child as announced: an approval must be of that child

    def approves(self, digest: str) -> bool:
        """Whether this is an approval of exactly the child with `digest`."""
        return self.decision == APPROVED and bool(digest) and self.digest == digest

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Entry:
        def text(k: str) -> str:
            return str(d.get(k) or "")

        return cls(text("decision"), text("by"), text("at"), text("reason"), text("child"),
                   text("digest"), d.get("announced") is True, text("seen"))


def path(root: Path, grove: str) -> Path:
    return paths.state(root) / "state" / f"{grove}.approvals.json"


def _lock(root: Path, grove: str) -> Path:
    return paths.state(root) / "locks" / f"{grove}.approvals.lock"


def digest(document: Mapping[str, Any]) -> str:
    """The identity of a judged child: its write-back document (`writeback.Spawn.document`)
    without the time it was judged."""
    spec = {k: v for k, v in dict(document.get("spec") or {}).items() if k != "spawnedAt"}
    text = json.dumps({**document, "spec": spec}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


SHOWN = 16  # hex digits of a digest people are shown and give back (approve --digest)
MAX_TASK = 2000  # characters: a task waiting for a person must fit what they are shown


def short(full: str) -> str:
    """The part of a digest people see: SHOWN hex digits, without the `sha256:` prefix."""
    return full.removeprefix("sha256:")[:SHOWN]


def key(parent: str, request: str) -> str:
    return f"{parent}/{request}"


def load(root: Path, grove: str) -> dict[str, Entry]:
    """Every entry of the grove ({} when there is no file); EngineError when the file is
    not one the engine wrote."""
    p = path(root, grove)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise EngineError(f"{p}: cannot be read ({e.strerror})") from None
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        doc = json.loads(raw)
        return {str(k): Entry.from_json(v) for k, v in doc["requests"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{p}: not an approvals file written by the engine ({e}); move "
                          "it away to start over") from None


@contextlib.contextmanager
def update(root: Path, grove: str) -> Iterator[dict[str, Entry]]:
    """The grove's entries to change in place; written back atomically when the block ends
    without an exception, under a lock held throughout."""
    with flock(_lock(root, grove)):
        entries = load(root, grove)
        yield entries
        doc = {"grove": grove, "requests": {k: e.to_json() for k, e in sorted(entries.items())}}
        atomic_write(path(root, grove), (json.dumps(doc, indent=1) + "\n").encode(), 0o600)


def approved(root: Path, grove: str) -> dict[str, Entry]:
    """The approvals recorded ({} when the file cannot be read: a commit's trailers are
    then left out, never the commit)."""
    try:
        entries = load(root, grove)
    except EngineError:
        return {}
    return {k: e for k, e in entries.items() if e.decision == APPROVED}
