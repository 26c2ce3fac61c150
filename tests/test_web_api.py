"""The web UI's server over real HTTP (`engine ui` as a subprocess, real local agents):
sign-in and every refusal of the guard (token, session, Host, Origin, method, body),
the status API answering with `status --json`'s own rows, and actions running the CLI:
their one-line errors, a message reaching a live agent, a saved plan applied as a job.
The browser drives the same server in tests/test_web_ui.py."""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, git, local_grove

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

URL = re.compile(r"http://(g[0-9a-f]{16}\.localhost):(\d+)/\?token=(\S+)")


class UI:
    """A running `engine ui` and a signed-in client of it."""

    def __init__(self, proc: subprocess.Popen[str], name: str, port: int, token: str
                 ) -> None:
        self.proc, self.name, self.port, self.token = proc, name, port, token
        self.session = ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, signed_in: bool = True
                ) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {"Host": f"{self.name}:{self.port}"}
        if signed_in and self.session:
            h["X-Grove-Session"] = self.session
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        out = {k.lower(): v for k, v in r.getheaders()}
        c.close()
        return r.status, out, data

    def sign_in(self, path: str = "/") -> str:
        """Trade the token for a session as the sign-in page does; the page's next
        address."""
        status, headers, page = self.request("GET", f"{path}?token={self.token}",
                                             signed_in=False)
        assert status == 200 and "set-cookie" not in headers, page
        m = re.search(rb'name="grove-session" content="([^"]+)"', page)
        n = re.search(rb'name="grove-next" content="([^"]*)"', page)
        assert m and n, page[:500]
        self.session = m.group(1).decode()
        return n.group(1).decode()

    def get(self, path: str) -> Any:
        status, _, data = self.request("GET", path)
        assert status == 200, (status, data)
        return json.loads(data)

    def act(self, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, Any]]:
        h = {"Content-Type": "application/json", **(headers or {})}
        status, _, data = self.request("POST", "/api/action", json.dumps(body).encode(), h)
        return status, json.loads(data)


def start_ui(repo: Path, *args: str) -> UI:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "engine", "ui", "--port", "0", *args],
                            cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = URL.search(line)
    if not m:  # never left running behind a failed test
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"engine ui printed no address: {line!r} {err!r}")
    return UI(proc, m.group(1), int(m.group(2)), m.group(3))


@pytest.fixture
def ui(repo: Path) -> Iterator[UI]:
    local_grove(repo, """\
    - name: listener
      task: |
        while read -r line; do printf '%s\\n' "$line" >> GOT; done
    - name: idle
      task: sleep 600
""")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    u = start_ui(repo)
    assert u.sign_in("//attacker.example/x") == "/attacker.example/x"  # this server only
    yield u
    u.proc.send_signal(signal.SIGTERM)
    try:
        _, err = u.proc.communicate(timeout=10)
        assert "Traceback" not in err, err
    except subprocess.TimeoutExpired:
        u.proc.kill()
        u.proc.communicate()
        raise
    finally:
        subprocess.run([sys.executable, "-P", "-m", "engine", "destroy", "-g", "demo",
                        "--auto-approve"], cwd=repo, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def until(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-m", "engine", *args], cwd=repo, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300)


def test_the_guard_refuses_what_the_printed_address_did_not_sign_in(ui: UI) -> None:
    # no session: no data; a page is a shell with no agent in it
    status, headers, body = ui.request("GET", "/api/status?grove=demo", signed_in=False)
    assert status == 401 and b"listener" not in body
    status, _, body = ui.request("GET", "/grove/demo", signed_in=False)
    assert status == 200 and b"listener" not in body and ui.session.encode() not in body
    status, _, body = ui.request("GET", "/api/stream?grove=demo", signed_in=False)
    assert status == 401
    # a wrong token gets no session
    status, headers, body = ui.request("GET", "/?token=" + "x" * len(ui.token),
                                       signed_in=False)
    assert status == 401 and ui.session.encode() not in body
    # no cookie is ever a credential (a browser sends cookies to every port of the host)
    for cookie in (f"grove_ui_{ui.port}={ui.session}", f"session={ui.session}"):
        status, _, _ = ui.request("GET", "/api/status?grove=demo",
                                  headers={"Cookie": cookie}, signed_in=False)
        assert status == 401
    # DNS rebinding: a page of another name resolving to 127.0.0.1
    status, _, _ = ui.request("GET", "/api/status?grove=demo",
                              headers={"Host": f"attacker.example:{ui.port}"})
    assert status == 421
    for host in (f"attacker.example:{ui.port}", f"127.0.0.1:{ui.port}",
                 f"localhost:{ui.port}", f"g{'0' * 16}.localhost:{ui.port}"):
        status, _, _ = ui.request("GET", f"/?token={ui.token}", signed_in=False,
                                  headers={"Host": host})
        assert status == 421, host
    # the printed address signs in one browser: used again, it brings no session
    status, _, body = ui.request("GET", f"/?token={ui.token}", signed_in=False)
    assert status == 401 and b'name="grove-session" content=""' in body
    assert ui.get("/api/status?grove=demo")["grove"]["grove"] == "demo"  # still signed in
    # no service worker can be installed on this origin
    status, _, _ = ui.request("GET", "/static/app.js", headers={"Service-Worker": "script"})
    assert status == 403
    # the pages run only the shipped assets (integrity), and those carry no secret
    status, _, page = ui.request("GET", "/grove/demo")
    assert page.count(b'integrity="sha384-') == 3
    # the stream takes the session in its URL (EventSource sets no header)
    c = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=30)
    c.request("GET", f"/api/stream?grove=demo&session={ui.session}",
              headers={"Host": f"{ui.name}:{ui.port}"})
    r = c.getresponse()
    assert r.status == 200 and r.read(14) == b"event: status\n"
    data = b""
    while not data.endswith(b"\n\n"):  # the rest of the first event
        data += r.read(1)
    assert data.startswith(b"data: {") and b'"listener"' in data
    c.close()
    # every response carries the strict policy
    status, headers, _ = ui.request("GET", "/grove/demo")
    csp = headers["content-security-policy"]
    assert status == 200 and "script-src 'self'" in csp and "unsafe" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_an_action_without_the_session_or_from_elsewhere_is_refused(
        ui: UI, repo: Path) -> None:
    body = {"action": "stop", "grove": "demo", "agent": "idle"}
    assert cli(repo, "apply", "-g", "demo", "--auto-approve").returncode == 0
    refusals = [
        ({"X-Grove-Session": ""}, 401),
        ({"X-Grove-Session": "x" * len(ui.session)}, 401),
        ({"Origin": "http://attacker.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Content-Type": "text/plain"}, 403),
    ]
    for h, code in refusals:
        status, doc = ui.act(body, h)
        assert status == code, (h, doc)
        assert doc["error"].startswith("error: "), doc
    status, _, _ = ui.request("PUT", "/api/action", b"{}",
                              {"Content-Type": "application/json"})
    assert status == 405
    status, _, _ = ui.request("POST", "/api/action", b"{" + b" " * 200_000 + b"}",
                              {"Content-Type": "application/json"})
    assert status == 413
    rows = {r["name"]: r for r in json.loads(cli(repo, "status", "--json").stdout)
            ["groves"][0]["agents"]}
    assert rows["idle"]["phase"] == "Running"  # nothing was stopped
    status, doc = ui.act(body, {"Origin": f"http://{ui.name}:{ui.port}",
                                "Sec-Fetch-Site": "same-origin"})  # the page's own
    assert status == 200 and doc["ok"], doc
    rows = {r["name"]: r for r in json.loads(cli(repo, "status", "--json").stdout)
            ["groves"][0]["agents"]}
    assert rows["idle"]["phase"] == "Stopped"


def test_status_is_the_status_document_and_follows_the_agents(ui: UI, repo: Path) -> None:
    doc = ui.get("/api/status?grove=demo")
    assert {r["name"]: r["phase"] for r in doc["grove"]["agents"]} == \
        {"idle": "Pending", "listener": "Pending"}
    assert cli(repo, "apply", "-g", "demo", "--auto-approve").returncode == 0
    want = json.loads(cli(repo, "status", "--json").stdout)["groves"][0]
    until(lambda: {r["name"]: r["phase"] for r in ui.get("/api/status?grove=demo")
                   ["grove"]["agents"]} == {r["name"]: r["phase"] for r in want["agents"]},
          10, "the page's status to show the applied agents")
    got = ui.get("/api/status?grove=demo")
    assert got["version"] > doc["version"]
    for mine, theirs in zip(got["grove"]["agents"], want["agents"], strict=True):
        assert set(mine) == set(theirs)
        for key in ("name", "phase", "branch", "parent", "runtime", "dependsOn", "usage"):
            assert mine[key] == theirs[key], key


def test_actions_run_the_cli_and_answer_its_one_line(ui: UI, repo: Path) -> None:
    # a package named engine in the repository (merged work could add one) is not run
    (repo / "engine").mkdir()
    (repo / "engine" / "__init__.py").write_text("")
    (repo / "engine" / "__main__.py").write_text("open('PWNED', 'w').close()\n")
    # not started yet: the CLI's own refusal, word for word
    status, doc = ui.act({"action": "stop", "grove": "demo", "agent": "idle"})
    assert not (repo / "PWNED").exists()
    want = cli(repo, "stop", "demo/idle")
    assert status == 409 and want.returncode == 1
    assert doc["error"] == want.stderr.strip().splitlines()[0]
    # malformed fields never become arguments
    for bad in ({"action": "stop", "grove": "demo", "agent": "--help"},
                {"action": "stop", "grove": "demo", "agent": "../x"},
                {"action": "stop", "grove": "demo"},
                {"action": "rm -rf", "grove": "demo", "agent": "idle"},
                {"action": "stop", "grove": "other", "agent": "idle"},
                {"action": "deny", "grove": "demo", "parent": "idle", "request": "r1"},
                {"action": "approve", "grove": "demo", "parent": "idle", "request": "-x"},
                {"action": "approve", "grove": "demo", "parent": "-idle", "request": "r1"},
                {"action": "approve", "grove": "demo", "parent": "idle", "request": "r1",
                 "digest": "zz"},
                {"action": "apply", "grove": "demo", "planId": "0" * 16},
                {"action": "message", "grove": "demo", "agent": "idle", "text": " "}):
        status, doc = ui.act(bad)
        assert status == 400 and doc["error"].startswith("error: "), (bad, doc)
        assert "\n" not in doc["error"]
    status, _, data = ui.request("POST", "/api/action", b"[1, 2",
                                 {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"] == "error: the request is not JSON"


def test_a_message_from_the_page_reaches_the_agent_and_a_saved_plan_applies(
        ui: UI, repo: Path) -> None:
    plan = ui.get("/api/plan?grove=demo")
    changes = {c["agent"]: c["action"] for c in plan["plan"]["groves"][0]["changes"]}
    assert changes == {"idle": "create", "listener": "create"}
    status, doc = ui.act({"action": "apply", "grove": "demo", "planId": plan["planId"]})
    assert status == 200 and doc["ok"], doc
    job = until(lambda: (j := ui.get(f"/api/job/{doc['job']}"))["done"] and j, 120,
                "the apply job")
    assert job["code"] == 0, job["output"]
    assert "listener" in job["output"]
    # the same plan again is stale now: apply refuses it, in one line
    status, doc = ui.act({"action": "apply", "grove": "demo", "planId": plan["planId"]})
    job = until(lambda: (j := ui.get(f"/api/job/{doc['job']}"))["done"] and j, 120,
                "the second apply job")
    assert job["code"] == 1 and "error:" in job["output"]
    got = repo / ".engine/worktrees/demo/listener/GOT"
    for text in ("--help", "hello from the page"):  # a dash is text, not an option
        status, doc = ui.act({"action": "message", "grove": "demo", "agent": "listener",
                              "text": text})
        assert status == 200 and doc["ok"], doc
        assert doc["message"] == "delivered to demo/listener"
    until(lambda: got.exists() and got.read_text().splitlines() ==
          ["--help", "hello from the page"], 20, "the messages in GOT")


def test_engine_ui_refuses_a_port_in_use_in_one_line(ui: UI, repo: Path) -> None:
    p = cli(repo, "ui", "--port", str(ui.port))
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{ui.port}: Address already in use"]
    # the same port of ::1 is the server's too: a browser trying ::1 first for the
    # .localhost name reaches no other program
    if socket.has_ipv6:
        six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            with pytest.raises(OSError) as taken:
                six.bind(("::1", ui.port, 0, 0))
            assert taken.value.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
            # and a port whose ::1 side another program holds is refused, in one line
            squat = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            squat.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                squat.bind(("::1", 0, 0, 0))
                squat.listen(1)
                port = squat.getsockname()[1]
                p = cli(repo, "ui", "--port", str(port))
                assert p.returncode == 1
                assert p.stderr.strip().splitlines() == [
                    f"error: cannot listen on 127.0.0.1:{port}: [::1]:{port} is taken by "
                    "another program"]
            except OSError as e:  # no IPv6 loopback on this machine
                assert e.errno == errno.EADDRNOTAVAIL
            finally:
                squat.close()
        finally:
            six.close()
    p = cli(repo, "ui", "--port", "70000")
    assert p.returncode == 2 and p.stderr.startswith("error: --port")  # a usage error
    p = cli(repo, "ui", "-g", "nope")
    assert p.returncode == 1 and "nope" in p.stderr and "Traceback" not in p.stderr


def test_a_plain_address_answers_to_127_0_0_1_only(repo: Path) -> None:
    local_grove(repo, "    - name: idle\n      task: sleep 600\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "engine", "ui", "--plain-address"],
                            cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", proc.stdout.readline())
        assert m
        u = UI(proc, "127.0.0.1", int(m.group(1)), m.group(2))
        status, _, _ = u.request("GET", "/grove/demo",
                                 headers={"Host": f"localhost:{u.port}"})
        assert status == 421
        u.sign_in()
        assert [a["name"] for a in u.get("/api/status?grove=demo")["grove"]["agents"]] == \
            ["idle"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err


def read_events(r: http.client.HTTPResponse, until_end: bool, want: str,
                timeout: float = 60) -> list[tuple[str, str]]:
    """Server-sent events of a stream, until `want` shows in a chunk (or the end)."""
    got: list[tuple[str, str]] = []
    end = time.monotonic() + timeout
    kind, line = "", b""
    while time.monotonic() < end:
        ch = r.read(1)
        if not ch:
            break
        line += ch
        if not line.endswith(b"\n"):
            continue
        text, line = line.decode().rstrip("\n"), b""
        if text.startswith("event: "):
            kind = text[7:]
        elif text.startswith("data: "):
            got.append((kind, json.loads(text[6:]) if kind == "chunk" else text[6:]))
            if kind == "end" or (not until_end and want in "".join(
                    d for k, d in got if k == "chunk")):
                return got
    raise AssertionError(f"the stream ended or timed out: {got!r}")


def test_an_agents_log_streams_to_the_page_until_it_ends(repo: Path) -> None:
    local_grove(repo, """\
    - name: talker
      task: |
        echo first-line; while [ ! -e GO ]; do sleep 0.1; done; printf 'second-line\\n'; sleep 1
    - name: sleeper
      task: echo awake; sleep 600
    - name: loud
      task: head -c 4000000 /dev/zero | tr '\\0' x | fold -w 100; sleep 600
""")
    assert cli(repo, "apply", "-g", "demo", "--auto-approve").returncode == 0
    u = start_ui(repo)
    try:
        u.sign_in()
        c = http.client.HTTPConnection("127.0.0.1", u.port, timeout=60)
        c.request("GET", "/api/agent/logs/stream?grove=demo&agent=talker&session=" +
                  u.session, headers={"Host": f"{u.name}:{u.port}"})
        r = c.getresponse()
        assert r.status == 200
        early = read_events(r, False, "first-line")
        assert not any("second-line" in d for _, d in early)  # it came before the rest
        (repo / ".engine/worktrees/demo/talker/GO").touch()  # now the rest
        rest = read_events(r, True, "")
        assert "second-line" in "".join(d for k, d in rest if k == "chunk")
        assert rest[-1] == ("end", "0")  # the agent ended: so does the stream
        c.close()
        # without the session: nothing
        status, _, _ = u.request("GET", "/api/agent/logs/stream?grove=demo&agent=talker",
                                 signed_in=False)
        assert status == 401
        # a bounded number of followers at once; one that leaves frees its place
        def follow() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            k = http.client.HTTPConnection("127.0.0.1", u.port, timeout=60)
            k.request("GET", "/api/agent/logs/stream?grove=demo&agent=sleeper&session=" +
                      u.session, headers={"Host": f"{u.name}:{u.port}"})
            return k, k.getresponse()

        open_ = [follow() for _ in range(8)]
        for _, resp in open_:
            assert resp.status == 200
            read_events(resp, False, "awake")
        k, resp = follow()
        assert resp.status == 400
        assert json.loads(resp.read())["error"].startswith("error: 8 log streams are open")
        k.close()
        for k, _ in open_:
            k.close()
        def freed() -> bool:
            k, resp = follow()
            k.close()
            return resp.status == 200
        until(freed, 10, "a place to free")
        # a page that stopped reading a big log does not hold the server past SIGTERM
        until(lambda: (repo / ".engine").exists() and "x" * 100 in cli(
            repo, "logs", "demo/loud").stdout[:200], 30, "loud's log")
        k = http.client.HTTPConnection("127.0.0.1", u.port, timeout=60)
        k.request("GET", "/api/agent/logs/stream?grove=demo&agent=loud&session=" +
                  u.session, headers={"Host": f"{u.name}:{u.port}"})
        assert k.getresponse().status == 200  # and never read
        time.sleep(1)
        u.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        u.proc.communicate(timeout=15)
        assert time.monotonic() - started < 8
        k.close()
        until(lambda: not subprocess.run(["pgrep", "-f", "engine logs demo/"],
                                         capture_output=True).stdout.strip(), 3,
              "the engine logs children to end with the server")
    finally:
        u.proc.send_signal(signal.SIGTERM)
        _, err = u.proc.communicate(timeout=10)
        cli(repo, "destroy", "-g", "demo", "--auto-approve")
    assert "Traceback" not in err


def test_requests_an_agent_wrote_are_drawn_only_when_they_name_a_child(
        ui: UI, repo: Path) -> None:
    """The requested nodes come from files an agent writes: read by the inbox's trust
    reader (a symlink is not followed), and drawn only under a name the gate could
    accept."""
    assert cli(repo, "apply", "-g", "demo", "--auto-approve").returncode == 0
    box = repo / ".engine/inbox/demo/idle"
    until(box.is_dir, 20, "idle's inbox")

    def req(rid: str, name: str) -> None:
        doc = {"apiVersion": "engine/v1alpha1", "kind": "SpawnRequest", "id": rid,
               "from": "idle", "spec": {"name": name, "task": "true"}}
        (box / f"req-{rid}.json").write_text(json.dumps(doc))

    req("a1", "kid")
    req("a2", "../x<img src=x onerror=alert(1)>")
    req("a3", "x" * 5000)
    (box / "req-a4.json").symlink_to("/etc/passwd")
    until(lambda: ui.get("/api/status?grove=demo")["requests"], 10, "the requests")
    got = ui.get("/api/status?grove=demo")["requests"]
    assert got == [{"id": "a1", "parent": "idle", "agent": "kid", "status": "pending"}]
    assert (box / "req-a4.json").is_symlink()  # left alone, never read through
