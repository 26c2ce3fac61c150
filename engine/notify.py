"""Stage 8, notifications to people: route the grove's new events to its `spec.notify`
channels (webhooks, commands, a JSON-lines file).

Called by the converge spine (stage 8) and by commands, as `dispatch(root, grove)`: it reads
the events of the grove appended since its cursor (`.engine/state/<grove>.notify-cursor`, a
byte offset into the event log; on first use the end of the log, so nothing old is
replayed), maps each to a notification kind (`kind_of`), routes it, and hands the
deliveries to a detached worker (`python -m engine.notify`) on the worker's standard input,
webhook URLs resolved: they are never on disk or in argv. `dispatch` returns in
milliseconds and never raises; what goes wrong becomes a `NotifyError` event.

The worker delivers every channel concurrently (one thread each), bounds each attempt
(timeout, retries with back-off) and its own life (`DEADLINE`); at most `WORKERS` run at
once (each holds a slot lock it inherits from `dispatch`; with none free, the events wait
for the next dispatch). A channel's health lives in `.engine/state/notify-health`: the
first failure after a success is a `NotificationFailed` event, the first success after
failures a `NotificationRecovered`; in between nothing, so a dead hook is said once. Events
name a webhook as "webhook NAME" and its failure by HTTP status or error class, never its
URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import http.client
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import __version__, checks, events, paths, secrets
from engine.desired import DesiredGrove, parse_duration
from engine.fsutil import atomic_write, flock
from engine.inventory import now
from engine.secrets import CredentialRef
from engine.trust import reader

KINDS = ("needs-input", "succeeded", "failed", "spawn-requested", "spawn-approved",
         "spawn-rejected", "budget-exceeded")
WORKERS = 4  # workers delivering at once, across the repository
DEADLINE = 120.0  # seconds a worker lives at most
BATCH = 4000  # events one dispatch takes at most (the rest wait for the next); one
# agent flooding the log is capped per batch (PER_AGENT_KIND), so a large batch keeps
# everyone else's notifications from falling behind it
READ_CAP = 2 * 1024 * 1024  # bytes of the event log one dispatch reads at most
TEXT_CAP = 1000  # characters of agent-supplied text in a notification
_PIPE = 1 << 20  # bytes the pipe to the worker is asked to hold (it may get less)
_LOCKS = "locks"
_STATE = "state"


def kind_of(event: Mapping[str, Any]) -> str | None:
    """The notification kind of an event, or None when people are not told of it."""
    match event.get("event"):
        case "NeedsInput":
            return "needs-input"
        case "AgentEnded":
            return {"Succeeded": "succeeded", "Failed": "failed"}.get(str(event.get("phase")))
        case "SpawnPendingApproval":
            return "spawn-requested"
        case "SpawnApproved":
            return "spawn-approved"
        case "SpawnRequest":
            return {"accepted": "spawn-approved", "rejected": "spawn-rejected"
                    }.get(str(event.get("status")))
        case "SpawnDenied":
            return "spawn-rejected"
        case "BudgetExceeded":
            return "budget-exceeded"
    return None


# -- configuration ----------------------------------------------------------------------

@dataclass(frozen=True)
class Channel:
    """One channel of `spec.notify.channels`: type webhook, command or stream."""

    name: str
    type: str
    url: CredentialRef | None = None  # webhook: where its URL is read from
    format: str = "json"  # webhook body: json | slack | discord
    timeout: float = 5.0  # seconds: one webhook attempt, one command run
    retries: int = 2  # webhook attempts after the first
    argv: tuple[str, ...] = ()  # command
    path: str = ""  # stream, as written

    @property
    def label(self) -> str:
        return f"{self.type} {self.name}"


@dataclass(frozen=True)
class Route:
    on: frozenset[str]  # kinds, or "*"
    to: tuple[str, ...]
    agents: tuple[str, ...] = ()  # globs; () = every agent

    def matches(self, kind: str, agent: str) -> bool:
        return ("*" in self.on or kind in self.on) and (
            not self.agents or any(fnmatch.fnmatchcase(agent, g) for g in self.agents))


@dataclass(frozen=True)
class Config:
    """`spec.notify`, parsed (the schema and `checks.notify` vouched for its shape)."""

    channels: Mapping[str, Channel] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Config:
        channels = {}
        for name, ch in sorted((spec.get("channels") or {}).items()):
            channels[name] = _channel(str(name), ch)
        routes = tuple(Route(frozenset(map(str, r.get("on") or ())),
                             tuple(map(str, r.get("to") or ())),
                             tuple(map(str, r.get("agents") or ())))
                       for r in spec.get("routes") or ())
        return cls(channels, routes)

    def targets(self, kind: str, agent: str) -> list[str]:
        """The channels a notification of `kind` about `agent` goes to, each once."""
        return sorted({t for r in self.routes if r.matches(kind, agent) for t in r.to
                       if t in self.channels})


def _channel(name: str, ch: Mapping[str, Any]) -> Channel:
    if "webhook" in ch:
        hook = ch["webhook"]
        src, ref = next(iter(hook["url"].items()))
        return Channel(name, "webhook",
                       url=CredentialRef(f"webhook {name}", "env" if src == "fromEnv"
                                         else "file", str(ref)),
                       format=str(hook.get("format", "json")),
                       timeout=float(parse_duration(hook.get("timeout")) or 5),
                       retries=int(hook.get("retries", 2)))
    if "command" in ch:
        return Channel(name, "command", argv=tuple(map(str, ch["command"])),
                       timeout=float(parse_duration(ch.get("timeout")) or 10))
    return Channel(name, "stream", path=str(ch["stream"]["path"]))


# -- notifications ----------------------------------------------------------------------

def _text(value: Any, limit: int = 200) -> str:
    return reader.one_line(str(value if value is not None else ""), limit)


def agent_of(event: Mapping[str, Any]) -> str:
    """The agent an event is about: `agent`, or the requesting agent of a spawn."""
    return _text(event.get("agent") or event.get("from") or "")


def notification(event: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """What every channel receives: the event's fields (one line each, capped), the kind
    and a sentence for people in `message`."""
    out: dict[str, Any] = {k: (_text(v, TEXT_CAP) if isinstance(v, str) else v)
                           for k, v in sorted(event.items())
                           if isinstance(v, str | int | float | bool) or v is None}
    if isinstance(event.get("task"), str):  # a task to approve is shown whole (every
        # line; the engine escaped what cannot be seen, and bounded it)
        out["task"] = reader.for_terminal(event["task"])[:3 * TEXT_CAP]
    out.update(kind=kind, grove=_text(event.get("grove")), agent=agent_of(event),
               event=_text(event.get("event")), time=_text(event.get("time")))
    if "message" in event:
        out["request"] = out.pop("message")  # the agent's words; `message` is ours
    out["message"] = describe(out)
    return out


def describe(n: Mapping[str, Any]) -> str:
    """One sentence for people about notification `n`."""
    who = f"{n.get('grove')}/{n.get('agent')}"
    child = f" {n['child']}" if n.get("child") else ""
    why = f": {n['reason']}" if n.get("reason") else ""
    by = f" by {n['by']}" if n.get("by") else ""
    text = {
        "needs-input": f"{who} needs input: {n.get('request', '')}",
        "succeeded": f"{who} succeeded",
        "failed": f"{who} failed (exit {n.get('exitCode', '?')}){why}",
        "spawn-requested": f"{who} asks to spawn{child} (request {n.get('id', '?')}, "
                           f"digest {n.get('digest', '?')}); it waits for approval: "
                           f"engine approve {n.get('id', '?')} --digest "
                           f"{n.get('digest', '?')}\ntask:\n{n.get('task', '')}",
        "spawn-approved": f"{who}: spawn of{child} approved{by}",
        "spawn-rejected": f"{who}: spawn of{child} rejected{by}{why}",
        "budget-exceeded": f"{who} exceeded its budget: used {n.get('used', '?')} of "
                           f"{n.get('limit', '?')}{why}",
    }.get(str(n.get("kind")), f"{who}: {n.get('kind')}")
    return _text(text, TEXT_CAP + 200)


# -- dispatch ---------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def dispatch(root: Path, grove: DesiredGrove) -> int:
    """Hand the grove's new events to a worker (module docstring); the number of
    deliveries handed over. Never raises."""
    if not grove.notify:
        return 0
    urls: list[str] = []
    try:
        _reap()
        root = Path(os.path.abspath(root))  # the worker's working directory too
        lock = paths.state(root) / _LOCKS / f"{grove.name}.notify.lock"
        with _try_lock(lock) as got:
            return _dispatch(root, grove, urls) if got else 0
    except Exception as e:  # notifications must never break what called them
        reason = f"{type(e).__name__}: {e}"
        for url in urls:  # before the text is cut: no part of a URL survives
            if url:
                reason = reason.replace(url, "<webhook URL>")
        reason = _text(reason, 300)
        with contextlib.suppress(Exception):
            events.record(root, {"grove": grove.name, "event": "NotifyError",
                                 "reason": reason})
        return 0


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """The grove's dispatch lock, waited for at most a few milliseconds (another dispatch
    holding it delivers; what it did not see waits for the next)."""
    for _ in range(10):
        with flock(path, blocking=False) as got:
            if got:
                yield True
                return
        time.sleep(0.002)
    yield False


def _dispatch(root: Path, grove: DesiredGrove, urls: list[str]) -> int:
    cursor = cursor_path(root, grove.name)
    log = events.path_for(root)
    start = _read_cursor(cursor)
    if start is None:  # first use: from now on
        atomic_write(cursor, str(_size(log)).encode())
        return 0
    if start > _size(log):  # the log was replaced: everything in it is new
        start = 0
    lines, end = _read_lines(log, start)
    if not lines:
        if end != start:  # one line longer than READ_CAP: skipped
            atomic_write(cursor, str(end).encode())
        return 0
    config = Config.from_spec(grove.notify)
    rd, wr = os.pipe()
    slot = None
    try:
        capacity = _grow(wr)
        while True:
            payload, count, end = _payload(root, grove.name, config, lines, urls)
            if len(payload) <= capacity or len(lines) == 1:
                break
            lines = lines[:len(lines) // 2]  # the rest waits for the next dispatch
        if count and len(payload) > capacity:
            events.record(root, {"grove": grove.name, "event": "NotifyError", "reason":
                                 "an event too large to hand over was skipped"})
        elif count:
            slot = _slot(root)
            if slot is None:
                return 0  # every worker is busy: these events wait for the next dispatch
            _start_worker(root, rd, slot)
            os.write(wr, payload)
        atomic_write(cursor, str(end).encode())
        return count if slot is not None else 0
    finally:
        for fd in (rd, wr, slot):
            if fd is not None:
                os.close(fd)


def _grow(pipe: int) -> int:
    """Make the pipe hold the whole payload, so writing it never waits for the worker;
    what it holds now."""
    with contextlib.suppress(OSError, AttributeError):
        return int(fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, _PIPE))
    with contextlib.suppress(OSError, AttributeError):
        return int(fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ))
    return 4096  # a page: what POSIX promises to take in one write


def cursor_path(root: Path, grove: str) -> Path:
    return paths.state(root) / _STATE / f"{grove}.notify-cursor"


def _read_cursor(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None  # damaged: start again from now


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int, cap: int = READ_CAP) -> tuple[list[bytes], int]:
    """Whole lines of `path` from byte `offset` (at most `cap` bytes, but at least one
    line's worth), and the offset after the last. A line being written is left for later."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(cap)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:  # no whole line: one longer than cap is skipped, a partial one waited for
        return ([], offset + len(data)) if len(data) >= cap else ([], offset)
    return data[:end].split(b"\n"), offset + end + 1


def _read_lines(log: Path, start: int
                ) -> tuple[list[tuple[int, dict[str, Any] | None]], int]:
    """(offset after the line, the event or None) for each new line, at most BATCH, and
    the offset after all that was read."""
    raw, end = read_from(log, start)
    out: list[tuple[int, dict[str, Any] | None]] = []
    pos = start
    for line in raw[:BATCH]:
        pos += len(line) + 1
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        out.append((pos, doc if isinstance(doc, dict) else None))
    return out, end


def _payload(root: Path, name: str, config: Config,
             lines: list[tuple[int, dict[str, Any] | None]], urls: list[str]
             ) -> tuple[bytes, int, int]:
    """The worker's input for these lines, how many deliveries it holds, and the offset
    after the last line."""
    notes: list[dict[str, Any]] = []
    plan: dict[str, list[int]] = {}
    # a person's decision is told once, by its SpawnApproved/SpawnDenied event: the
    # answer to the same request (a SpawnRequest event beside it) is not told again
    seen: dict[tuple[str, str], int] = {}
    decided = {(ev.get("from"), ev.get("id")) for _, ev in lines if ev is not None
               and ev.get("event") in ("SpawnApproved", "SpawnDenied")}
    for _, ev in lines:
        kind = kind_of(ev) if ev is not None and ev.get("grove") == name else None
        if ev is None or kind is None:
            continue
        if ev.get("event") == "SpawnRequest" and (ev.get("from"), ev.get("id")) in decided:
            continue
        who = (agent_of(ev), kind)
        seen[who] = seen.get(who, 0) + 1
        if seen[who] > PER_AGENT_KIND:  # one agent cannot flood people: counted instead
            continue
        targets = config.targets(kind, agent_of(ev))
        if targets:
            notes.append(notification(ev, kind))
            for t in targets:
                plan.setdefault(t, []).append(len(notes) - 1)
    for (agent, kind), n in sorted(seen.items()):
        more = n - PER_AGENT_KIND
        targets = config.targets(kind, agent) if more > 0 else []
        if targets:
            note = notification({"grove": name, "agent": agent, "event": "Summary"}, kind)
            note["message"] = (f"{name}/{agent}: {more} more {kind} notifications in this "
                               "batch were left out (engine events shows them)")
            notes.append(note)
            for t in targets:
                plan.setdefault(t, []).append(len(notes) - 1)
    channels = {t: _resolved(root, config.channels[t], urls) for t in sorted(plan)}
    doc = {"root": str(root), "grove": name, "channels": channels, "notifications": notes,
           "plan": plan}
    return json.dumps(doc).encode(), sum(map(len, plan.values())), lines[-1][0]


def _resolved(root: Path, ch: Channel, urls: list[str]) -> dict[str, Any]:
    """A channel as the worker needs it: the webhook's URL read (or why it cannot be),
    a stream's file as an absolute path."""
    out: dict[str, Any] = {"type": ch.type, "name": ch.name, "timeout": ch.timeout}
    if ch.type == "webhook" and ch.url is not None:
        out.update(format=ch.format, retries=ch.retries)
        try:
            url = secrets.read(ch.url).strip()
        except secrets.MissingSecret as e:
            out["error"] = _text(e.summary)  # names where it looked, never a value
            return out
        urls.append(url)
        if not url.lower().startswith(("http://", "https://")):
            out["error"] = f"{ch.label}: the URL is not an http(s) URL"
        else:
            out["url"] = url
    elif ch.type == "command":
        out["argv"] = list(ch.argv)
    else:
        path = Path(ch.path) if Path(ch.path).is_absolute() else root / ch.path
        why = checks.stream_path_problem(ch.path)
        if not why and path.resolve() == events.path_for(root).resolve():
            why = "that is the event log"
        out.update({"error": f"{ch.label}: {why}"} if why else {"path": str(path)})
    return out


def _slot(root: Path) -> int | None:
    """An fd holding one of the WORKERS slot locks (the worker inherits it, so the slot
    is taken until the worker ends), or None when all are taken."""
    for i in range(WORKERS):
        lock = paths.state(root) / _LOCKS / f"notify-worker-{i}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd
    return None


def _start_worker(root: Path, stdin: int, slot: int) -> None:
    """Start the detached worker reading `stdin`, holding `slot` until it ends."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    # -P and cwd "/": nothing in the repository (which agents can write) is on the
    # worker's import path; it finds the engine through PYTHONPATH only
    env.pop("PYTHONSTARTUP", None)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "engine.notify"], stdin=stdin,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                            env=env, start_new_session=True, close_fds=True, pass_fds=(slot,))
    _children.append(proc)


def _reap() -> None:
    """Collect workers this process started that have ended (no zombies)."""
    _children[:] = [p for p in _children if p.poll() is None]


# -- the worker (`python -m engine.notify`, input on stdin) -----------------------------

def main() -> int:
    """The worker: deliver what `dispatch` wrote to stdin, then exit (never past
    DEADLINE, whatever a channel does)."""
    root: Path | None = None
    try:
        doc = json.loads(sys.stdin.buffer.read(8 << 20))
        root = Path(doc["root"])
        work(root, doc, time.monotonic() + DEADLINE)
    except Exception as e:
        if root is not None:
            with contextlib.suppress(Exception):
                events.record(root, {"grove": str(doc.get("grove", "")),
                                     "event": "NotifyError",
                                     "reason": f"worker: {type(e).__name__}"})
    os._exit(0)  # threads still stuck in a hook end with the process


def work(root: Path, doc: Mapping[str, Any], deadline: float) -> None:
    """Each channel's notifications, in order, in a thread per channel."""
    grove, notes = str(doc["grove"]), list(doc["notifications"])
    running = []
    for name, ch in sorted(doc["channels"].items()):
        items = [notes[i] for i in doc["plan"].get(name, [])]
        if not items:
            continue
        t = threading.Thread(target=_deliver_all, args=(root, grove, ch, items, deadline),
                             daemon=True)
        t.start()
        running.append((name, items, t))
    for name, items, t in running:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            _health(root, grove, name, str(items[0]["kind"]), "deadline exceeded")


def _deliver_all(root: Path, grove: str, ch: Mapping[str, Any],
                 items: list[dict[str, Any]], deadline: float) -> None:
    for n in items:
        error = _deliver(root, ch, n, deadline)
        _health(root, grove, str(ch["name"]), str(n["kind"]), error)
        if error:
            return  # the rest of this batch is not tried: a failing channel is not hammered


def _deliver(root: Path, ch: Mapping[str, Any], n: Mapping[str, Any], deadline: float
             ) -> str:
    """"" when `n` reached the channel, else why not (never a URL)."""
    if ch.get("error"):
        return str(ch["error"])
    timeout = float(ch.get("timeout") or 5)
    if ch["type"] == "webhook":
        return _webhook(str(ch["url"]), body(n, str(ch.get("format", "json"))), timeout,
                        int(ch.get("retries", 0)), deadline)
    if ch["type"] == "command":
        return _command([str(a) for a in ch["argv"]], n, root, timeout, deadline)
    return _append(Path(str(ch["path"])), n)


PER_AGENT_KIND = 5  # notifications of one kind about one agent per batch; the rest counted
_MENTIONS = re.compile(r"@(channel|here|all|everyone)\b", re.IGNORECASE)
# what a notification command inherits: enough for notify-send and friends, no credentials
_COMMAND_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "DISPLAY",
                "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")


def body(n: Mapping[str, Any], fmt: str) -> bytes:
    """A webhook's body: the notification (json), Slack's {"text"} or Discord's
    {"content"} (agents' words can mention nobody: Slack's <!channel> is escaped,
    Discord's mentions are off)."""
    text = str(n.get("message", ""))
    if fmt == "slack":
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        # services that take Slack's body (Mattermost, Rocket.Chat) read a plain
        # @channel/@here/@all as a mention: a zero-width joiner defuses it
        esc = _MENTIONS.sub(lambda m: "@\u2060" + m.group(1), esc)
        return json.dumps({"text": esc}).encode()
    if fmt == "discord":
        return json.dumps({"content": text[:2000], "allowed_mentions": {"parse": []}}
                          ).encode()
    return json.dumps(dict(n), sort_keys=True).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None  # a 3xx is an answer to report, not a place to send the body


_OPENER = urllib.request.build_opener(_NoRedirect)


def _webhook(url: str, data: bytes, timeout: float, retries: int, deadline: float) -> str:
    error = ""
    for attempt in range(retries + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            return error or "deadline exceeded"
        error, again = _post(url, data, min(timeout, left))
        if not error or not again:
            return error
        if attempt < retries:
            time.sleep(max(0.0, min(0.5 * 2 ** attempt, 8.0, deadline - time.monotonic())))
    return error


def _post(url: str, data: bytes, timeout: float) -> tuple[str, bool]:
    """(error, worth retrying) of one POST; the error is a status or an error class."""
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"grove-engine/{__version__}"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            resp.read(1 << 16)
        return "", False
    except urllib.error.HTTPError as e:
        e.close()
        return f"HTTP {e.code}", e.code >= 500 or e.code == 429
    except urllib.error.URLError as e:
        why = e.reason
        if isinstance(why, TimeoutError):
            return "timed out", True
        return (type(why).__name__ if isinstance(why, BaseException) else "URLError"), True
    except TimeoutError:
        return "timed out", True
    except (OSError, http.client.HTTPException, ValueError) as e:
        return type(e).__name__, True


def _command(argv: list[str], n: Mapping[str, Any], root: Path, timeout: float,
             deadline: float) -> str:
    env = {**{k: os.environ[k] for k in _COMMAND_ENV if k in os.environ},
           "ENGINE_NOTIFY_KIND": str(n["kind"]),
           "ENGINE_NOTIFY_GROVE": str(n["grove"]), "ENGINE_NOTIFY_AGENT": str(n["agent"])}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd="/", env=env,
                                start_new_session=True)
    except FileNotFoundError:
        return "command not found"
    except OSError as e:
        return e.strerror or type(e).__name__
    limit = max(0.0, min(timeout, deadline - time.monotonic()))
    try:
        proc.communicate(json.dumps(dict(n), sort_keys=True).encode() + b"\n", timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {limit:g}s"
    return f"exit {proc.returncode}" if proc.returncode else ""


def _append(path: Path, n: Mapping[str, Any]) -> str:
    """One JSON line onto `path` under an exclusive lock on it (never through a symlink,
    never into a FIFO or device)."""
    line = json.dumps(dict(n), sort_keys=True).encode() + b"\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                     os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "not a regular file"
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        return e.strerror or type(e).__name__
    return ""


def health_path(root: Path) -> Path:
    return paths.state(root) / _STATE / "notify-health"


def _health(root: Path, grove: str, channel: str, kind: str, error: str) -> None:
    """Record a channel's result; an event only when it turns (failing <-> working)."""
    path, key = health_path(root), f"{grove}/{channel}"
    with flock(paths.state(root) / _LOCKS / "notify-health.lock"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        was = doc.get(key)
        if bool(error) == bool(isinstance(was, dict) and was.get("failing")):
            return
        doc[key] = {"failing": bool(error), "since": now(), "error": error}
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
        ev = {"grove": grove, "channel": channel, "kind": kind}
        events.record(root, {**ev, "event": "NotificationFailed", "error": error} if error
                      else {**ev, "event": "NotificationRecovered"})


if __name__ == "__main__":
    main()
