"""What the web UI shows, built from the engine's own result objects: the status document
(`status_doc`, as `status --json`), the plan document (`plan.document`, as `plan --json`),
the event log and the inbox. Reads only; called by `engine.web.app`.

Everything here that an agent wrote (reasons, messages, tasks, logs) stays data: the front
end inserts it as text, never as markup.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import (
    converge,
    desired,
    events,
    inbox,
    layers,
    manifest,
    paths,
    plan,
    secrets,
    status_doc,
)
from engine.desired import DesiredGrove
from engine.errors import EngineError
from engine.fsutil import atomic_write
from engine.observe import Runtimes

MAX_EVENTS = 500  # events of a grove the page is given
RECENT = 40  # events of a grove the live status carries
MAX_EVENT_READ = 4 * 1024 * 1024  # bytes of new events read per refresh
MAX_TASK = 2000  # characters of a request's task shown


@dataclass
class _Loaded:
    stamp: tuple[tuple[str, int, int], ...]
    grove: DesiredGrove


@dataclass
class Reader:
    """The read side of one `engine ui` server: its repository and a cache of loaded
    manifests (reloaded when a file of the grove changes)."""

    root: Path
    rts: Runtimes = field(init=False)
    _cache: dict[str, _Loaded] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rts = Runtimes(self.root)

    def groves(self) -> list[str]:
        return [d.name for d in manifest.grove_dirs(self.root)]

    def options(self, resolve_secrets: bool = False) -> desired.Options:
        return desired.Options(
            user=layers.load_user_config(), sets={}, resolve_secrets=resolve_secrets,
            secret_key=secrets.repo_key(paths.state(self.root), True)
            if resolve_secrets else b"", repo_root=self.root)

    def grove(self, name: str) -> DesiredGrove:
        """The grove's desired state, secrets not resolved; cached until a file of its
        directory changes."""
        [d] = manifest.select_groves(self.root, [name])
        stamp = _stamp(d)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit.stamp == stamp:
                return hit.grove
        g = desired.build(manifest.load_grove(d, self.root), self.options())
        with self._lock:
            self._cache[name] = _Loaded(stamp, g)
        return g

    def status(self, name: str, with_work: bool = False,
               tail: EventTail | None = None) -> dict[str, Any]:
        """The grove's status entry (as `status --json`), the spawn requests not taken
        in yet (the graph shows them as requested nodes) and, with `tail`, its newest
        events."""
        entry = status_doc.grove_entry(self.root, self.grove(name), self.rts, with_work)
        return {"grove": entry, "requests": self.requests(name),
                "events": tail.read() if tail is not None else []}

    def requests(self, name: str) -> list[dict[str, str]]:
        reqs, _ = inbox.scan(self.root, name)
        out = []
        for q in reqs:
            if q.kind != "SpawnRequest":
                continue
            child = str(q.spec.get("name", ""))
            if inbox.NAME.fullmatch(child):  # a name the gate could accept, else not drawn
                out.append({"id": q.id, "parent": q.agent, "agent": child,
                            "status": "pending"})
        return out

    def plan(self, name: str) -> dict[str, Any]:
        """What apply would do (`plan --json`'s document), computed as `engine plan` does."""
        g = self.grove(name)
        res = converge.run(self.root, converge.Ask(g.name, loaded=g, execute=False),
                           self.rts, self.options(resolve_secrets=True))
        return plan.document([res.plan])

    def inbox(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Who waits for a person: agents WaitingForInput (from the status entry) and spawn
        requests waiting for approval (from the plan: the child as judged, its digest and
        whole task)."""
        waiting = []
        for row in status["grove"]["agents"]:
            for c in row.get("conditions") or ():
                if c.get("type") == "WaitingForInput":
                    waiting.append({"agent": row["name"], "message": c.get("message", ""),
                                    "since": c.get("since", "")})
        approvals = []
        doc = self.plan(name)  # one document: what is shown is what the digest binds
        for gp in doc["groves"]:
            for r in gp.get("spawnRequests", ()):
                if r.get("approval") == "pending":
                    approvals.append({
                        "id": r["request"], "parent": r["parent"], "agent": r["agent"],
                        "digest": r.get("digest", ""), "task": r.get("task", "")[:MAX_TASK],
                        "profile": r.get("profile", ""), "harness": r.get("harness", ""),
                        "dependsOn": r.get("dependsOn", [])})
        return {"waiting": waiting, "approvals": approvals}

    def events(self, name: str, tail: int = MAX_EVENTS) -> list[dict[str, Any]]:
        return [e for e in events.read(self.root) if e.get("grove") == name][-tail:]

    def save_plan(self, doc: dict[str, Any], where: Path, plan_id: str) -> Path:
        path = where / f"{plan_id}.json"
        atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), 0o600)
        return path


def _stamp(d: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a file of a grove directory changes (names, sizes, mtimes)."""
    out = []
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.append((e.name, st.st_size, st.st_mtime_ns))
    except OSError as e:
        raise EngineError(f"groves/{d.name}: {e.strerror}") from None
    return tuple(sorted(out))


class EventTail:
    """The newest events of one grove, read incrementally from the event log (only the
    bytes appended since the last read; from the start again if the log was replaced)."""

    def __init__(self, root: Path, grove: str) -> None:
        self.path = events.path_for(root)
        self.grove = grove
        self.offset = 0
        self.ino = -1
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.ino or st.st_size < self.offset:
                    self.ino, self.offset = st.st_ino, max(0, st.st_size - MAX_EVENT_READ)
                    self.recent.clear()
                f.seek(self.offset)
                chunk = f.read(MAX_EVENT_READ)
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written waits
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and e.get("grove") == self.grove:
                self.recent.append(e)
        return list(self.recent)
