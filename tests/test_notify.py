"""Notifications to people (`spec.notify`, engine.notify, `engine events`): real HTTP
receivers on 127.0.0.1, a real program as a command channel, a real JSON-lines file, the
real detached worker; the CLI driven as `python -m engine`.

A receiver that accepts and never answers, one that answers 500 and a port nobody listens
on must neither slow `dispatch` nor keep the working channels from their notifications;
each failing channel is reported once per run of failures, and the webhook URL (a
credential) appears nowhere under .engine or in any output.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import desired, events, manifest, notify, schema
from tests.conftest import ROOT, write_grove

TOKEN = "s3cr3t-hook-token"  # in every webhook URL: must never show up anywhere
ENGINE = [sys.executable, "-m", "engine"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records POST bodies. `mode`: ok (204), fail (500)
    or hang (reads the request, never answers until the test ends)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.release = threading.Event()
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                me.paths.append(self.path)
                if me.mode == "hang":
                    me.release.wait(60)
                    return
                if me.mode == "ok":
                    me.bodies.append(json.loads(data))
                self.send_response(204 if me.mode == "ok" else 500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[[str], Receiver]]:
    made: list[Receiver] = []

    def make(mode: str = "ok") -> Receiver:
        made.append(Receiver(mode))
        return made[-1]
    yield make
    for r in made:
        r.close()


def refused_url() -> str:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/{TOKEN}"


GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: demo}}
spec:
  notify:
{notify}
  profiles:
    local: {{runtime: local}}
  agents:
    - {{name: lead, task: 'true'}}
    - {{name: helper, task: 'true'}}
"""


def grove(repo: Path, notify_yaml: str) -> desired.DesiredGrove:
    write_grove(repo, "demo", GROVE.format(notify=notify_yaml))
    return desired.build(manifest.load_grove(repo / "groves" / "demo", repo))


def settle(repo: Path, timeout: float = 30) -> None:
    """Wait until no notification worker runs: every worker slot lock can be taken."""
    locks = repo / ".engine" / "locks"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = False
        for lock in locks.glob("notify-worker-*.lock"):
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
            finally:
                os.close(fd)
        if not busy:
            return
        time.sleep(0.05)
    raise AssertionError("notification workers still running")


def wait_for(cond: Callable[[], Any], timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def logged(repo: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in events.read(repo) if e.get("event") == event]


def no_secret_anywhere(repo: Path, *outputs: str) -> None:
    for p in (repo / ".engine").rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert TOKEN.encode() not in p.read_bytes(), p
    for text in outputs:
        assert TOKEN not in text


def cmdlines() -> list[bytes]:
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes())
        except OSError:
            continue  # ended meanwhile
    return out


def cli(repo: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*ENGINE, *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- the mapping ------------------------------------------------------------------------

def test_kind_of_maps_the_engine_events() -> None:
    cases = [
        ({"event": "NeedsInput", "agent": "a", "message": "?"}, "needs-input"),
        ({"event": "AgentEnded", "phase": "Succeeded"}, "succeeded"),
        ({"event": "AgentEnded", "phase": "Failed"}, "failed"),
        ({"event": "AgentEnded", "phase": "Stopped"}, None),
        ({"event": "SpawnPendingApproval"}, "spawn-requested"),
        ({"event": "SpawnApproved"}, "spawn-approved"),
        ({"event": "SpawnRequest", "status": "accepted"}, "spawn-approved"),
        ({"event": "SpawnRequest", "status": "rejected"}, "spawn-rejected"),
        ({"event": "SpawnRequest", "status": "pending"}, None),
        ({"event": "SpawnDenied"}, "spawn-rejected"),
        ({"event": "BudgetExceeded"}, "budget-exceeded"),
        ({"event": "NotificationFailed"}, None),  # never a loop of notifications
        ({"event": "MessageRequest", "status": "accepted"}, None),
        ({}, None),
    ]
    for event, kind in cases:
        assert notify.kind_of(event) == kind, event
    # the schema's list of kinds is the one the engine routes
    spec = json.loads((schema.schema_dir() / "grove.json").read_text())
    route = spec["properties"]["spec"]["properties"]["notify"]["properties"]["routes"]
    assert route["items"]["properties"]["on"]["items"]["enum"] == ["*", *notify.KINDS]


def test_notify_is_not_part_of_any_spec_hash(repo: Path) -> None:
    a = grove(repo, "    routes: []")
    b = grove(repo, "    channels: {f: {stream: {path: .engine/n.jsonl}}}\n"
                    "    routes: [{on: ['*'], to: [f]}]")
    assert a.notify != b.notify and b.notify["routes"][0]["to"] == ["f"]
    assert [x.spec_hash for x in a.agents] == [x.spec_hash for x in b.agents]


# -- delivery ---------------------------------------------------------------------------

NOTIFIER = """\
#!/bin/sh
cat > "$1/$ENGINE_NOTIFY_KIND.json"
printf '%s %s %s\\n' "$ENGINE_NOTIFY_KIND" "$ENGINE_NOTIFY_GROVE" "$ENGINE_NOTIFY_AGENT" \\
  > "$1/$ENGINE_NOTIFY_KIND.env"
"""


def test_every_channel_gets_its_notifications(repo: Path, tmp_path: Path,
                                              receivers: Callable[[str], Receiver],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = {f: receivers("ok") for f in ("json", "slack", "discord")}
    for f, r in hooks.items():
        monkeypatch.setenv(f"HOOK_{f.upper()}", r.url)
    (tmp_path / "hook-file").write_text(hooks["discord"].url + "\n")
    script = tmp_path / "notifier.sh"
    script.write_text(NOTIFIER)
    script.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    g = grove(repo, f"""\
    channels:
      generic: {{webhook: {{url: {{fromEnv: HOOK_JSON}}}}}}
      slack: {{webhook: {{url: {{fromEnv: HOOK_SLACK}}, format: slack}}}}
      discord: {{webhook: {{url: {{fromFile: {tmp_path / 'hook-file'}}}, format: discord}}}}
      desk: {{command: [{script}, {out}], timeout: 10s}}
      audit: {{stream: {{path: .engine/notify.jsonl}}}}
    routes:
      - {{on: [needs-input, failed], to: [generic, slack, desk]}}
      - {{on: [failed], to: [discord]}}
      - {{on: ['*'], to: [audit], agents: ['lead*']}}""")
    events.record(repo, {"grove": "demo", "event": "AgentEnded", "agent": "lead",
                         "phase": "Failed", "exitCode": 9, "reason": "old news"})
    assert notify.dispatch(repo, g) == 0  # first use: what was logged before is not replayed
    events.record(repo, {"grove": "demo", "event": "NeedsInput", "agent": "lead",
                         "message": "which database? <!channel> @everyone"})
    events.record(repo, {"grove": "other", "event": "NeedsInput", "agent": "lead",
                         "message": "another grove's"})
    events.record(repo, {"grove": "demo", "event": "AgentEnded", "agent": "helper",
                         "phase": "Failed", "exitCode": 3, "reason": "tests failed"})
    events.record(repo, {"grove": "demo", "event": "SpawnRequest", "from": "lead",
                         "id": "r1", "status": "accepted", "child": "kid", "reason": ""})
    # generic/slack/desk: needs-input + failed; discord: failed; audit: the two of lead
    assert notify.dispatch(repo, g) == 2 * 3 + 1 + 2
    assert notify.dispatch(repo, g) == 0  # nothing new
    settle(repo)

    generic = hooks["json"].bodies
    assert [b["kind"] for b in generic] == ["needs-input", "failed"]
    assert generic[0]["grove"] == "demo" and generic[0]["agent"] == "lead"
    assert generic[0]["event"] == "NeedsInput" and generic[0]["time"]
    assert generic[0]["request"] == "which database? <!channel> @everyone"
    assert generic[0]["message"] == "demo/lead needs input: which database? <!channel> " \
                                    "@everyone"
    assert generic[1]["exitCode"] == 3 and generic[1]["agent"] == "helper"
    assert generic[1]["message"] == "demo/helper failed (exit 3): tests failed"
    assert hooks["slack"].bodies == [
        # <!channel> escaped, @everyone defused (a word joiner after the @)
        {"text": "demo/lead needs input: which database? &lt;!channel&gt; @\u2060everyone"},
        {"text": "demo/helper failed (exit 3): tests failed"}]
    assert hooks["discord"].bodies == [{"content": "demo/helper failed (exit 3): tests "
                                                   "failed", "allowed_mentions": {"parse": []}}]
    assert json.loads((out / "needs-input.json").read_text())["request"].startswith("which")
    assert (out / "failed.env").read_text() == "failed demo helper\n"
    audit = [json.loads(x) for x in (repo / ".engine/notify.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["agent"]) for a in audit] == [("needs-input", "lead"),
                                                        ("spawn-approved", "lead")]
    assert audit[1]["child"] == "kid"
    assert logged(repo, "NotificationFailed") == [] and logged(repo, "NotifyError") == []
    no_secret_anywhere(repo)


def test_failing_hooks_slow_nothing_and_are_reported_once(
        repo: Path, receivers: Callable[[str], Receiver],
        monkeypatch: pytest.MonkeyPatch) -> None:
    hang, broken, good = receivers("hang"), receivers("fail"), receivers("ok")
    monkeypatch.setenv("HANG", hang.url)
    monkeypatch.setenv("BROKEN", broken.url)
    monkeypatch.setenv("REFUSED", refused_url())
    monkeypatch.setenv("GOOD", good.url)
    g = grove(repo, """\
    channels:
      hang: {webhook: {url: {fromEnv: HANG}, timeout: 2s, retries: 0}}
      broken: {webhook: {url: {fromEnv: BROKEN}, timeout: 2s, retries: 1}}
      refused: {webhook: {url: {fromEnv: REFUSED}, timeout: 2s, retries: 1}}
      good: {webhook: {url: {fromEnv: GOOD}}}
      unset: {webhook: {url: {fromEnv: NOT_SET_ANYWHERE}}}
    routes:
      - {on: ['*'], to: [hang, broken, refused, good, unset]}""")
    assert notify.dispatch(repo, g) == 0

    def ended(n: int) -> None:
        events.record(repo, {"grove": "demo", "event": "AgentEnded", "agent": "lead",
                             "phase": "Failed", "exitCode": n, "reason": f"run {n}"})

    ended(1)
    t = time.monotonic()
    assert notify.dispatch(repo, g) == 5
    assert time.monotonic() - t < 0.5
    wait_for(lambda: good.bodies)  # the working hook is not held up by the hanging one
    assert good.bodies[0]["exitCode"] == 1
    wait_for(lambda: hang.paths)
    assert not any(TOKEN.encode() in c for c in cmdlines())  # never in any argv
    settle(repo)
    failed = {e["channel"]: e for e in logged(repo, "NotificationFailed")}
    assert sorted(failed) == ["broken", "hang", "refused", "unset"]
    assert failed["broken"]["error"] == "HTTP 500" and failed["broken"]["kind"] == "failed"
    assert failed["hang"]["error"] == "timed out"
    assert failed["refused"]["error"] == "ConnectionRefusedError"
    assert failed["unset"]["error"] == "credential webhook unset: environment variable " \
                                       "NOT_SET_ANYWHERE is not set"
    assert len(broken.paths) == 2  # one retry

    ended(2)  # still failing: nothing more is said
    t = time.monotonic()
    assert notify.dispatch(repo, g) == 5
    assert time.monotonic() - t < 0.5
    settle(repo)
    assert len(logged(repo, "NotificationFailed")) == 4
    assert [b["exitCode"] for b in good.bodies] == [1, 2]

    broken.mode = "ok"  # the first success after failures is said, once
    ended(3)
    notify.dispatch(repo, g)
    settle(repo)
    ended(4)
    notify.dispatch(repo, g)
    settle(repo)
    recovered = logged(repo, "NotificationRecovered")
    assert [(e["channel"], e["kind"]) for e in recovered] == [("broken", "failed")]
    assert [b["exitCode"] for b in broken.bodies] == [3, 4]
    assert len(logged(repo, "NotificationFailed")) == 4
    health = json.loads(notify.health_path(repo).read_text())
    assert health["demo/broken"]["failing"] is False and health["demo/hang"]["failing"]

    shown = cli(repo, "events")
    shown_json = cli(repo, "events", "--json")
    assert shown.returncode == 0 and "NotificationFailed" in shown.stdout
    no_secret_anywhere(repo, shown.stdout, shown.stderr, shown_json.stdout)


def test_workers_are_capped_and_events_wait_for_a_slot(repo: Path, tmp_path: Path) -> None:
    g = grove(repo, """\
    channels: {audit: {stream: {path: .engine/notify/audit.jsonl}}}
    routes: [{on: ['*'], to: [audit]}]""")
    assert notify.dispatch(repo, g) == 0
    events.record(repo, {"grove": "demo", "event": "NeedsInput", "agent": "lead",
                         "message": "hello"})
    locks = repo / ".engine" / "locks"
    held = []
    for i in range(notify.WORKERS):  # every slot taken, as by running workers
        fd = os.open(locks / f"notify-worker-{i}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    cursor = notify.cursor_path(repo, "demo").read_text()
    try:
        assert notify.dispatch(repo, g) == 0
        assert notify.cursor_path(repo, "demo").read_text() == cursor  # not consumed
    finally:
        for fd in held:
            os.close(fd)
    assert notify.dispatch(repo, g) == 1
    settle(repo)
    lines = (repo / ".engine/notify/audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["request"] for x in lines] == ["hello"]


def test_broken_and_huge_log_lines_are_stepped_over(repo: Path) -> None:
    g = grove(repo, """\
    channels: {audit: {stream: {path: .engine/audit.jsonl}}}
    routes: [{on: ['*'], to: [audit]}]""")
    assert notify.dispatch(repo, g) == 0
    with open(events.path_for(repo), "ab") as f:
        f.write(b"not json\r\n[1, 2]\n" + b"x" * (notify.READ_CAP + 10) + b"\n")
    events.record(repo, {"grove": "demo", "event": "SpawnDenied", "from": "lead",
                         "id": "r7", "child": "kid", "by": "ann", "reason": "too many"})
    for _ in range(3):  # the huge line takes a dispatch of its own
        if notify.dispatch(repo, g):
            break
    settle(repo)
    (line,) = (repo / ".engine/audit.jsonl").read_text().splitlines()
    assert json.loads(line)["message"] == "demo/lead: spawn of kid rejected by ann: too many"
    assert notify.cursor_path(repo, "demo").read_text() == \
        str(events.path_for(repo).stat().st_size)


def test_dispatch_never_raises(repo: Path) -> None:
    g = grove(repo, f"""\
    channels:
      log: {{stream: {{path: {repo / '.engine' / 'events.jsonl'}}}}}
      nowhere: {{command: [/nonexistent/notifier]}}
    routes: [{{on: ['*'], to: [log, nowhere]}}]""")
    assert notify.dispatch(repo, g) == 0
    events.record(repo, {"grove": "demo", "event": "BudgetExceeded", "agent": "lead",
                         "limit": 10, "used": 12, "reason": "tokens"})
    assert notify.dispatch(repo, g) == 2
    settle(repo)
    failed = {e["channel"]: e["error"] for e in logged(repo, "NotificationFailed")}
    assert failed == {"log": "stream log: that is the event log",
                      "nowhere": "command not found"}
    # the engine's state directory damaged: an event says so, dispatch returns
    cursor = notify.cursor_path(repo, "demo")
    cursor.unlink()
    cursor.mkdir()
    assert notify.dispatch(repo, g) == 0
    (err,) = logged(repo, "NotifyError")
    assert err["grove"] == "demo" and "\n" not in err["reason"]


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize(("notify_yaml", "line", "says"), [
    ("    channels: {a: {stream: {path: .engine/n.jsonl}}}\n"
     "    routes:\n      - {on: [failed, finished], to: [a]}", 8,
     "spec.notify.routes[0].on[1]: 'finished' is not one of *, needs-input"),
    ("    channels: {a: {stream: {path: .engine/n.jsonl}}}\n"
     "    routes:\n      - {on: [failed], to: [a, b]}", 8,
     "spec.notify.routes[0].to: unknown channel 'b' (channels: a)"),
    ("    channels:\n      a: {webhook: {url: {fromEnv: X}, timeout: 0s}}", 7,
     "spec.notify.channels.a: timeout 0s is not positive"),
    ("    channels:\n      a: {webhook: {url: {fromEnv: X}, timeout: -1}}", 7,
     "spec.notify.channels.a.webhook.timeout: -1 is less than the minimum of 1"),
    ("    channels:\n      a: {webhook: {url: {fromEnv: X}, retries: 11}}", 7,
     "spec.notify.channels.a.webhook.retries: 11 is greater than the maximum of 10"),
    ("    channels:\n      a: {webhook: {url: {fromEnv: X}, retries: -1}}", 7,
     "spec.notify.channels.a.webhook.retries: -1 is less than the minimum of 0"),
    ("    channels:\n      a: {stream: {path: .engine/inbox/demo/x.jsonl}}", 7,
     "spec.notify.channels.a: stream path .engine/inbox/demo/x.jsonl: a relative path "
     "must be a file directly in .engine/"),
    ("    channels:\n      a: {stream: {path: ../elsewhere.jsonl}}", 7,
     "spec.notify.channels.a: stream path ../elsewhere.jsonl: a relative path must stay "
     "inside .engine/ (or be absolute)"),
    ("    channels:\n      a: {command: [x], stream: {path: .engine/n.jsonl}}", 7,
     "spec.notify.channels.a: needs exactly one of webhook, command or stream"),
    # a script in the checkout is a file agents can write: never run as the engine's user
    ("    channels:\n      a: {command: [./scripts/notify.sh]}", 7,
     "spec.notify.channels.a: command './scripts/notify.sh': a path in the repository"),
])
def test_validate_refuses_bad_notify_specs(repo: Path, notify_yaml: str, line: int,
                                           says: str) -> None:
    write_grove(repo, "demo", GROVE.format(notify=notify_yaml))
    res = cli(repo, "validate")
    assert res.returncode == 1, res
    first, count = res.stderr.splitlines()
    assert first.startswith(f"error: groves/demo/grove.yaml:{line}:"), first
    assert f"grove demo: {says}" in first and count == "1 problem found"
    assert "Traceback" not in res.stderr


def test_validate_accepts_the_documented_example(repo: Path) -> None:
    write_grove(repo, "demo", GROVE.format(notify="""\
    channels:
      ops: {webhook: {url: {fromEnv: OPS_HOOK}, format: slack, timeout: 5s, retries: 2}}
      desk: {command: [notify-send, grove-engine], timeout: 10s}
      audit: {stream: {path: .engine/notify.jsonl}}
    routes:
      - {on: [needs-input, failed, budget-exceeded], to: [ops, desk]}
      - {on: ['*'], to: [audit], agents: ['lead*']}"""))
    res = cli(repo, "validate")
    assert res.returncode == 0 and res.stdout.startswith("valid: 1 grove"), res


# -- engine events ----------------------------------------------------------------------

def test_events_command(repo: Path) -> None:
    write_grove(repo, "demo", GROVE.format(notify="    routes: []"))
    res = cli(repo, "events")
    assert res.returncode == 0 and res.stdout == "No events recorded.\n"
    events.record(repo, {"grove": "demo", "event": "NeedsInput", "agent": "lead",
                         "message": "pick \x1b[31mred\x1b[0m or \x9b2Jblue?"})
    events.record(repo, {"grove": "other", "event": "AgentEnded", "agent": "x",
                         "phase": "Failed", "exitCode": 1, "reason": "boom"})
    res = cli(repo, "events")
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and "\x1b" not in res.stdout and "\x9b" not in res.stdout
    assert "  demo/lead  NeedsInput  message=\"pick red or blue?\"" in lines[0]
    assert "  other/x  AgentEnded  exitCode=1 phase=Failed reason=boom" in lines[1]
    res = cli(repo, "events", "--json", "--kind", "failed")
    assert [json.loads(x)["grove"] for x in res.stdout.splitlines()] == ["other"]
    assert cli(repo, "events", "-g", "demo", "--kind", "AgentEnded").stdout == \
        "No matching events.\n"
    assert len(cli(repo, "events", "--tail", "1").stdout.splitlines()) == 1
    for bad, text in ((("--kind", "bogus"), "not a notification kind"),
                      (("-g", "nosuch"), "grove nosuch: not found"),
                      (("--tail", "-1"), "--tail")):
        res = cli(repo, "events", *bad)
        assert res.returncode in (1, 2) and res.stdout == "", res
        assert res.stderr.count("\n") == 1 and text in res.stderr, res.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*ENGINE, "events", "--follow", "--json", "-g", "demo"],
                            cwd=repo, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "NeedsInput"
        events.record(repo, {"grove": "other", "event": "X"})
        events.record(repo, {"grove": "demo", "event": "AgentEnded", "agent": "lead",
                             "phase": "Succeeded", "exitCode": 0, "reason": ""})
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline())
                                  if proc.stdout else None, daemon=True)
        reader.start()
        reader.join(15)
        assert got and json.loads(got[0])["phase"] == "Succeeded"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
