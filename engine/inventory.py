"""Inventory: what the engine created for a grove, and the grove's operation lock.

Called by `observe` (read), `executor` (save after every agent) and the commands that
mutate (lock). `.engine/state/<grove>.json` holds a lineage (fixed at creation), a serial
(bumped on every save) and one record per agent the engine owns, so only owned things are
ever pruned. Saves are atomic (temp file, fsync, rename). The lock is a file created
exclusively, holding who took it for what and the holder's pid and start time; a lock
whose holder process is gone on this host (or whose pid now names a later process) is
taken over, one held on another host needs `engine force-unlock ID`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
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
    stopped: bool = False  # `engine stop`: stays stopped (no restart) until `engine start`
    error: str = ""  # why the last create/start failed ("" when it did not)
    pruned_at: str = ""  # `engine prune --finished`: the ended agent's workspace is gone
    # tokens and cost the harness reported (engine.usage): totals of the runs that ended
    # (`usage`) and the current run's latest report (`run_usage`); {} = nothing reported
    usage: dict[str, Any] = field(default_factory=dict)
    run_usage: dict[str, Any] = field(default_factory=dict)
    run_mark: str = ""  # which run `run_usage` belongs to ("<restarts>:<createdAt>")
    waiting: str = ""  # WaitingForInput: the harness's message ("" = not waiting)
    waiting_since: str = ""
    needs_input_told: str = ""  # when the last NeedsInput event was recorded (rate limit)
    stopped_reason: str = ""  # why the engine stopped it (e.g. a budget), "" = a person
    done_mark: str = ""  # run_mark of the run that reported done (+":exit" once ended)
    announced: str = ""  # last ending recorded as an AgentEnded event ("<phase>:<restarts>")

    def pruned_phase(self) -> str | None:
        """The phase an agent `engine prune --finished` removed ended in (Succeeded or
        Failed); None when this is not such an agent's record. Prune tells the parent
        first, so the `notified` mark ("<phase>:<restarts>") holds it."""
        if not self.pruned_at:
            return None
        phase = self.notified.partition(":")[0]
        return phase if phase in ("Succeeded", "Failed") else None


@dataclass
class Inventory:
    grove: str
    lineage: str = ""  # set on the first save; "" means no state yet
    serial: int = 0
    agents: dict[str, Record] = field(default_factory=dict)
    revision: str = ""  # commit the grove was last converged from ("" = working tree)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "grove": self.grove, "lineage": self.lineage,
                "serial": self.serial, "revision": self.revision,
                "agents": {n: asdict(r) for n, r in sorted(self.agents.items())}}


def path_for(state_dir: Path, grove: str) -> Path:
    return state_dir / "state" / f"{grove}.json"


STATE_CAP = 512 << 20  # bytes: a state file larger than this is not one the engine wrote


def load(state_dir: Path, grove: str) -> Inventory:
    from engine import yamlio  # here: the egress gateway ships this module without PyYAML

    p = path_for(state_dir, grove)
    try:  # never a FIFO, a device or a link (no hang, no endless read)
        raw = json.loads(yamlio.read_regular(p, STATE_CAP, follow_symlinks=False))
    except FileNotFoundError:
        return Inventory(grove)
    except (OSError, ValueError, yamlio.NotReadable) as e:
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
        return Inventory(grove, str(raw["lineage"]), int(raw["serial"]), agents,
                         str(raw.get("revision") or ""))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise EngineError(f"grove {grove}: state file {p} is damaged ({e}); move it away to "
                          "start over (the engine then adopts what still runs)") from None


def save(state_dir: Path, inv: Inventory, bump: bool = True) -> None:
    """Write the inventory atomically. `bump`: a change a saved plan must see (not what
    agents report about themselves, which would make every saved plan stale)."""
    inv.lineage = inv.lineage or uuid.uuid4().hex
    if bump or not inv.serial:
        inv.serial += 1
    data = json.dumps(inv.to_json(), indent=1, sort_keys=True).encode()
    atomic_write(path_for(state_dir, inv.grove), data)


# -- lock -------------------------------------------------------------------------------

POLL = 0.05  # seconds between looks at a held lock, when waiting for it


@dataclass(frozen=True)
class LockInfo:
    id: str
    operation: str
    who: str
    pid: int
    host: str
    created: str
    started: str = ""  # the holder's start time (/proc/<pid>/stat field 22); "" unknown

    def describe(self) -> str:
        return (f"{self.operation} by {self.who} (pid {self.pid} on {self.host}) since "
                f"{self.created}, lock ID {self.id}")


def _lock_path(state_dir: Path, grove: str) -> Path:
    return state_dir / "state" / f"{grove}.lock"


def read_lock(state_dir: Path, grove: str) -> LockInfo | None:
    """The current lock, or None when there is none (or it is unreadable: taken over)."""
    try:
        raw = json.loads(_lock_path(state_dir, grove).read_text())
        known = set(LockInfo.__dataclass_fields__)
        info = LockInfo(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return info if isinstance(info.pid, int) and isinstance(info.started, str) else None


def start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), as
    a string; "" when it cannot be read. With the pid it names a process, even after the
    pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # field 2 (the command) is in parentheses and may hold anything: count after it
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else ""


def _same_host(info: LockInfo) -> bool:
    return info.host == socket.gethostname()


def _alive(info: LockInfo) -> bool:
    """Whether the holder may still run: the pid is there and, when the lock recorded
    when it started, it is the same process (not a later one given the same pid)."""
    if not _same_host(info):
        return True  # cannot tell: assume it is
    if info.pid <= 0:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: its start time still tells
    if info.started:
        now_started = start_time(info.pid)
        return not now_started or now_started == info.started
    return True


def _locked_error(grove: str, holder: LockInfo) -> LockedError:
    if _same_host(holder):
        hint = (f"wait for it to finish, or stop it (kill -TERM {holder.pid}); it releases "
                "the lock itself")
    else:
        hint = (f"it runs on another host; if that operation is gone: engine force-unlock "
                f"{holder.id} -g {grove}")
    return LockedError(f"grove {grove} is locked: {holder.describe()}", hint)


@contextlib.contextmanager
def locked(state_dir: Path, grove: str, operation: str, wait: float = 0.0
           ) -> Iterator[LockInfo]:
    """Hold the grove's lock for `operation`; LockedError names the current holder.
    With `wait`, a lock held by a live process is waited for up to `wait` seconds.

    The lock file appears whole (written to a temporary file, then hard-linked into
    place, which fails when it exists), and taking it, including taking over from a
    holder that died, happens under a short flock, so two operations never both hold it."""
    p = _lock_path(state_dir, grove)
    p.parent.mkdir(parents=True, exist_ok=True)
    info = LockInfo(uuid.uuid4().hex[:12], operation, os.environ.get("USER", "unknown"),
                    os.getpid(), socket.gethostname(), now(), start_time(os.getpid()))
    deadline = time.monotonic() + wait
    while True:
        with flock(p.with_suffix(".lock.guard")):
            holder = read_lock(state_dir, grove)
            if holder is None or not _alive(holder):
                _take(p, info)
                break
        if time.monotonic() >= deadline:
            raise _locked_error(grove, holder)
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
    try:
        yield info
    finally:
        with flock(p.with_suffix(".lock.guard")):
            if (cur := read_lock(state_dir, grove)) is not None and cur.id == info.id:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _take(p: Path, info: LockInfo) -> None:
    """Put our lock file in place (under the guard): whatever was there is dead or not a
    lock (absent, unreadable, or left by a process that died)."""
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    tmp = p.with_name(f".{p.name}.{info.id}")
    tmp.write_text(json.dumps(asdict(info)))
    try:
        os.link(tmp, p)
    finally:
        tmp.unlink()


def held(state_dir: Path, grove: str, lock_id: str) -> bool:
    """Whether `lock_id` is still the grove's lock (a holder notices it lost it). A lock
    file that is there but cannot be read now (out of descriptors) is not a lost lock."""
    cur = read_lock(state_dir, grove)
    if cur is None:
        try:
            return _lock_path(state_dir, grove).exists() and not \
                _lock_path(state_dir, grove).read_text()
        except OSError:
            return True
    return cur.id == lock_id


def force_unlock(state_dir: Path, grove: str, lock_id: str) -> LockInfo:
    """Remove the grove's lock `lock_id`: one left by a process that is gone, or held on
    another host (which this host cannot check). A live holder on this host is refused,
    unless it is this very process (releasing its own lock)."""
    p = _lock_path(state_dir, grove)
    with flock(p.with_suffix(".lock.guard")):
        holder = read_lock(state_dir, grove)
        if holder is None:
            raise EngineError(f"grove {grove} is not locked")
        if holder.id != lock_id:
            raise EngineError(f"grove {grove}: lock ID {lock_id} does not match the current "
                              f"lock ({holder.describe()})")
        mine = holder.pid == os.getpid() and holder.started == start_time(os.getpid())
        if _same_host(holder) and _alive(holder) and not mine:
            raise EngineError(f"grove {grove}: lock ID {lock_id} is held by a live process "
                              f"({holder.operation}, pid {holder.pid} on {holder.host}); "
                              f"stop it first (kill -TERM {holder.pid}), or it releases "
                              "the lock itself")
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return holder


def release(state_dir: Path, grove: str, lock_id: str) -> None:
    """Remove the lock when it is still `lock_id` (its holder ends without unwinding: the
    controller's reaper after a signal)."""
    p = _lock_path(state_dir, grove)
    with flock(p.with_suffix(".lock.guard")):
        cur = read_lock(state_dir, grove)
        if cur is not None and cur.id == lock_id:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
