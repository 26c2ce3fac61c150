"""Inventory: what the engine created for a grove, and the grove's operation lock.

Called by `observe` (read), `executor` (save after every agent) and the commands that
mutate (lock). `.engine/state/<grove>.json` holds a lineage (fixed at creation), a serial
(bumped on every save) and one record per agent the engine owns, so only owned things are
ever pruned. Saves are atomic (temp file, fsync, rename). The lock is a file created
exclusively, holding who took it for what; a lock whose holder process is gone on this
host is taken over, anything else needs `engine force-unlock ID`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError, LockedError
from engine.fsutil import atomic_write, flock

FORMAT = 1


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Record:
    """One agent the engine created (and so may delete)."""

    spec_hash: str
    settings: str  # canonical JSON of the applied settings, to say which fields changed
    runtime: str
    host: str = ""
    branch: str = ""
    workdir: str = ""  # path relative to the repository root
    workspace: str = "worktree"
    base_commit: str = ""
    created_at: str = ""
    restarts: int = 0
    pending: bool = False  # waiting on dependsOn; nothing runs yet
    parent: str = ""
    notified: str = ""  # last phase reported to the parent's inbox


@dataclass
class Inventory:
    grove: str
    lineage: str = ""  # set on the first save; "" means no state yet
    serial: int = 0
    agents: dict[str, Record] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "grove": self.grove, "lineage": self.lineage,
                "serial": self.serial,
                "agents": {n: asdict(r) for n, r in sorted(self.agents.items())}}


def path_for(state_dir: Path, grove: str) -> Path:
    return state_dir / "state" / f"{grove}.json"


def load(state_dir: Path, grove: str) -> Inventory:
    p = path_for(state_dir, grove)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        return Inventory(grove)
    except (OSError, ValueError) as e:
        raise EngineError(f"grove {grove}: state file {p} is unreadable ({e}); it is "
                          "written atomically, so this is outside damage") from None
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")
        known = set(Record.__dataclass_fields__)
        agents = {}
        for n, r in raw.get("agents", {}).items():
            if not isinstance(r, dict) or "spec_hash" not in r:
                raise ValueError(f"agent {n!r} has no spec_hash")
            agents[str(n)] = Record(**{k: v for k, v in r.items() if k in known})
        return Inventory(grove, str(raw["lineage"]), int(raw["serial"]), agents)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise EngineError(f"grove {grove}: state file {p} is damaged ({e}); move it away to "
                          "start over (the engine then adopts what still runs)") from None


def save(state_dir: Path, inv: Inventory) -> None:
    inv.lineage = inv.lineage or uuid.uuid4().hex
    inv.serial += 1
    data = json.dumps(inv.to_json(), indent=1, sort_keys=True).encode()
    atomic_write(path_for(state_dir, inv.grove), data)


# -- lock -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LockInfo:
    id: str
    operation: str
    who: str
    pid: int
    host: str
    created: str

    def describe(self) -> str:
        return (f"{self.operation} by {self.who} (pid {self.pid} on {self.host}) since "
                f"{self.created}, lock ID {self.id}")


def _lock_path(state_dir: Path, grove: str) -> Path:
    return state_dir / "state" / f"{grove}.lock"


def read_lock(state_dir: Path, grove: str) -> LockInfo | None:
    try:
        return LockInfo(**json.loads(_lock_path(state_dir, grove).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(info: LockInfo) -> bool:
    if info.host != socket.gethostname():
        return True  # cannot tell: assume it is
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(state_dir: Path, grove: str, operation: str) -> Iterator[LockInfo]:
    """Hold the grove's lock for `operation`; LockedError names the current holder.

    The lock file appears whole (written to a temporary file, then hard-linked into
    place, which fails when it exists), and taking it, including taking over from a
    holder that died, happens under a short flock, so two operations never both hold it."""
    p = _lock_path(state_dir, grove)
    p.parent.mkdir(parents=True, exist_ok=True)
    info = LockInfo(uuid.uuid4().hex[:12], operation,
                    os.environ.get("USER", "unknown"), os.getpid(), socket.gethostname(), now())
    with flock(p.with_suffix(".lock.guard")):
        held = read_lock(state_dir, grove)
        if held is not None and _alive(held):
            raise LockedError(f"grove {grove} is locked: {held.describe()}",
                              f"if that operation is gone: engine force-unlock {held.id} "
                              f"-g {grove}")
        with contextlib.suppress(FileNotFoundError):
            p.unlink()  # absent, unreadable or left by a process that died: take over
        tmp = p.with_name(f".{p.name}.{info.id}")
        tmp.write_text(json.dumps(asdict(info)))
        try:
            os.link(tmp, p)
        finally:
            tmp.unlink()
    try:
        yield info
    finally:
        with flock(p.with_suffix(".lock.guard")):
            if (cur := read_lock(state_dir, grove)) is not None and cur.id == info.id:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def force_unlock(state_dir: Path, grove: str, lock_id: str) -> LockInfo:
    held = read_lock(state_dir, grove)
    if held is None:
        raise EngineError(f"grove {grove} is not locked")
    if held.id != lock_id:
        raise EngineError(f"grove {grove}: lock ID {lock_id} does not match the current "
                          f"lock ({held.describe()})")
    _lock_path(state_dir, grove).unlink()
    return held
