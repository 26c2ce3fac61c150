"""The web UI (`engine ui`) in a real browser.

The server runs as a person starts it (`engine ui -g GROVE --port 0`, a subprocess on
127.0.0.1 that prints its one-time URL), Chromium drives the pages through Playwright, and
the grove behind them is real: local-runtime agents in tmux running shell tasks, real git,
the real agent-side client for spawns and reports, the real CLI for everything the test
does on the side. The security checks talk plain HTTP to the same server.

Each browser session also checks what the page itself did: no script error, no request the
Content-Security-Policy refused (inline code or style), no request leaving the server's
origin.

What is checked: the graph shows every agent once, with its phase, and keeps nodes where
they are; a spawn request shows on an open page within 2 s; an agent waiting for input is
answered from the inbox (its question shown as text, never markup); a spawn is approved
from the inbox; the plan applies from its page; every page shows its part; and the guard
refuses what has no token, no session, another Host, another origin or a form's body.

Screenshots of each page land in $GROVE_UI_SCREENSHOTS (the docs keep them in docs/img),
else in the test's temporary directory, with measurements.txt: how soon a spawn request
and a change reach an open page, how long a 500-agent grove takes to draw (printed, not
asserted).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, git, local_grove, searchable, write_grove
from tests.test_approval import engine_proc, requests, until
from tests.test_approval import grove as approval_grove
from tests.test_signals import agent, report

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install playwright)")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync",
        "--disable-dev-shm-usage"]
URL = re.compile(r"http://g[0-9a-f]{16}\.localhost:\d+/\?token=\S+")
VIEWPORT = {"width": 1280, "height": 800}
G = "demo"


# --- the server, the browser, the page --------------------------------------------------

class Server:
    """`engine ui` as a person runs it, in `repo`: its URL (with the token), the base URL
    and the token; stopped with SIGTERM."""

    def __init__(self, repo: Path, grove: str) -> None:
        stamp = time.monotonic_ns()
        self.log = repo.parent / f"ui-{stamp}.log"
        self.tmp = repo.parent / f"ui-tmp-{stamp}"  # its temporary files, to see them go
        self.tmp.mkdir()
        self.lines: list[str] = []
        found = threading.Event()
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "ui", "-g", grove, "--port", "0"], cwd=repo,
                env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.tmp)},
                stdout=subprocess.PIPE, stderr=err, text=True)

        def drain() -> None:  # keeps reading, so the server never blocks on its stdout
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if URL.search(line):
                    found.set()

        self.drainer = threading.Thread(target=drain, daemon=True)
        self.drainer.start()
        if not found.wait(30):
            self.stop()
            raise AssertionError(f"engine ui printed no URL: {self.lines!r}\n{self.text()}")
        m = URL.search("".join(self.lines))
        assert m
        self.url = m.group(0)
        self.base = self.url.split("/?", 1)[0]  # its own name under .localhost
        self.host = urllib.parse.urlsplit(self.base).netloc
        # what a program without the browser's .localhost resolution connects to
        self.ip_base = f"http://127.0.0.1:{urllib.parse.urlsplit(self.base).port}"
        self.token = urllib.parse.parse_qs(urllib.parse.urlsplit(self.url).query)["token"][0]

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.drainer.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def ui(repo: Path) -> Iterator[Callable[..., Server]]:
    """Start `engine ui` servers (in `repo` unless told); all are stopped at the end, and
    the repository's agents with them (their tmux server)."""
    started: list[Server] = []

    def start(grove: str = G, where: Path | None = None) -> Server:
        s = Server(where or repo, grove)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
    subprocess.run(["tmux", "-S", str(repo / ".engine" / "tmux.sock"), "kill-server"],
                   capture_output=True)
    for s in started:  # a server-side bug is a traceback on stderr, even when pages coped
        assert "Traceback" not in s.text(), s.text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


class Session:
    """One browser context logged in through the server's URL. It records what the page
    must never do: throw, have the CSP refuse something, or reach beyond the server."""

    def __init__(self, browser: Any, server: Server) -> None:
        self.server = server
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.set_default_timeout(15_000)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)
        self.page.on("response", self._response)
        self.page.goto(server.url)  # the token becomes a session in localStorage

    def _console(self, msg: Any) -> None:
        # a failed load is checked by its response (the browser's own favicon.ico fetch,
        # which the page has no say in, is not one of the page's responses)
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.problems.append(f"console: {msg.text}")

    def _request(self, req: Any) -> None:
        if not (req.url.startswith(self.server.base + "/") or req.url.startswith("data:")):
            self.problems.append(f"request off the origin: {req.url}")

    def _response(self, resp: Any) -> None:
        if resp.status >= 400:
            self.problems.append(f"HTTP {resp.status}: {resp.url}")

    def open(self, path: str, ready: str) -> Any:
        """Go to `path` and wait until `ready` (a selector) is on it."""
        self.page.goto(self.server.base + path)
        self.page.wait_for_selector(ready)
        return self.page

    def close(self) -> None:
        self.context.close()
        # a refused resource (CSP) or a script error is a front-end bug; so is any request
        # the page makes to another origin
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def session(browser: Any) -> Iterator[Callable[[Server], Session]]:
    opened: list[Session] = []

    def open_session(server: Server) -> Session:
        s = Session(browser, server)
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        s.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and measurements.txt go; measurements start empty per run."""
    d = Path(os.environ.get("GROVE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "measurements.txt").write_text("")
    return d


def measured(shots: Path, line: str) -> None:
    print(line, flush=True)
    with (shots / "measurements.txt").open("a") as f:
        f.write(line + "\n")


# --- the grove on the side: the real CLI ------------------------------------------------

def status(repo: Path) -> dict[str, dict[str, Any]]:
    p = engine_proc(repo, "status", "--json")
    assert p.returncode == 0, p.stderr
    return {a["name"]: a for a in json.loads(p.stdout)["groves"][0]["agents"]}


def phases(repo: Path) -> dict[str, str]:
    return {n: a["phase"] for n, a in status(repo).items()}


def apply(repo: Path) -> bool:
    p = engine_proc(repo, "apply", "--auto-approve")
    assert p.returncode == 0, p.stderr
    return True


def commit(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def workspace(repo: Path, name: str) -> Path:
    return repo / status(repo)[name]["workspace"]


# --- in the page ------------------------------------------------------------------------

NODE = 'svg#graph g.node[data-agent="{}"]'
NODES_JS = """() => Array.from(document.querySelectorAll('svg#graph g.node'),
    n => [n.getAttribute('data-agent'), n.getAttribute('data-phase')])"""
# where each node sits, in the SVG's own units (so a grown viewBox does not count as a move)
POSITIONS_JS = """() => {
  const svg = document.getElementById('graph'), inv = svg.getScreenCTM().inverse(), out = {};
  for (const n of document.querySelectorAll('svg#graph g.node')) {
    const m = inv.multiply(n.getScreenCTM()), b = n.getBBox();
    out[n.getAttribute('data-agent')] = [Math.round(m.a * b.x + m.c * b.y + m.e),
                                         Math.round(m.b * b.x + m.d * b.y + m.f)];
  }
  return out;
}"""


def page_nodes(page: Any) -> list[list[str]]:
    nodes: list[list[str]] = page.evaluate(NODES_JS)
    return nodes


def page_phases_match(page: Any, repo: Path) -> bool:
    return dict(map(tuple, page_nodes(page))) == phases(repo)  # type: ignore[arg-type]


# --- 1. the graph -----------------------------------------------------------------------

FOUR = """\
    - name: lead
      task: "engine spawn kid --task 'sleep 300'; sleep 300"
    - name: build
      task: "echo built"
    - name: test
      dependsOn: [build]
      task: "sleep 300"
    - name: idle
      task: "sleep 300"
"""


@pytest.mark.slow
def test_the_grove_graph_shows_every_agent_once_with_its_phase(
        repo: Path, ui: Callable[..., Server], session: Callable[[Server], Session]) -> None:
    local_grove(repo, FOUR)
    commit(repo)
    want = {"lead", "build", "test", "idle", "kid"}
    until(lambda: apply(repo) and set(phases(repo)) == want
          and phases(repo)["test"] != "Pending", 60, "the four agents and lead's child")
    s = session(ui())
    page = s.open(f"/grove/{G}", NODE.format("kid"))
    # one node per agent `engine status` lists (a request node left beside its agent, or
    # a node drawn twice, is a second entry)
    names = sorted(n for n, _ in page_nodes(page))
    assert names == sorted(want), names
    until(lambda: page_phases_match(page, repo), 20, "the page's phases to match status")
    assert phases(repo)["build"] == "Succeeded" and phases(repo)["idle"] == "Running"
    rows = page.eval_on_selector_all("table#agents tr[data-agent]",
                                     "rs => rs.map(r => r.getAttribute('data-agent'))")
    assert sorted(rows) == sorted(want), rows
    assert page.locator("svg#graph path.edge.spawn").count() == 1  # lead -> kid
    assert page.locator("svg#graph path.edge.dep").count() == 1  # build -> test
    assert "Running" in page.inner_text("p#summary")
    page.click(NODE.format("kid"))  # a node leads to its agent's page
    page.wait_for_url(f"**/agent/{G}/kid")
    page.wait_for_selector("section#summary")
    assert page.get_attribute("body", "data-agent") == "kid"
    page.click('button.action[data-action="stop"]')  # and its buttons act
    page.wait_for_selector("#flash p.ok")
    until(lambda: phases(repo)["kid"] == "Stopped", 20, "kid to stop")
    page.wait_for_function("() => document.querySelector('section#summary').textContent"
                           ".includes('Stopped')", timeout=45_000)  # a loaded CI machine


# --- 2. a spawn shows within 2 s --------------------------------------------------------

WAITER = """\
    - name: waiter
      task: "while [ ! -f GO ]; do sleep 0.1; done; engine spawn kid --task 'sleep 300'; \
sleep 300"
    - name: other
      task: "sleep 300"
"""


@pytest.mark.slow
def test_a_spawn_request_appears_on_an_open_page_within_two_seconds(
        repo: Path, ui: Callable[..., Server], session: Callable[[Server], Session],
        shots: Path) -> None:
    local_grove(repo, WAITER)
    commit(repo)
    apply(repo)
    until(lambda: phases(repo) == {"waiter": "Running", "other": "Running"}, 30, "Running")
    s = session(ui())
    page = s.open(f"/grove/{G}", NODE.format("other"))
    page.wait_for_selector('#live.live')
    before = page.evaluate(POSITIONS_JS)
    assert set(before) == {"waiter", "other"}, before
    (workspace(repo, "waiter") / "GO").write_text("")
    box = repo / ".engine" / "inbox" / G / "waiter"
    deadline = time.monotonic() + 30
    while not list(box.glob("req-*.json")):  # the clock starts when the request exists
        assert time.monotonic() < deadline, "the agent wrote no spawn request"
        time.sleep(0.01)
    asked = time.monotonic()
    page.wait_for_selector(NODE.format("kid"), timeout=10_000)
    shown = time.monotonic() - asked
    measured(shots, f"spawn request shown: {shown * 1000:.0f} ms")
    assert shown < 2.0, f"the spawn took {shown:.2f} s to appear"
    kid = page.locator(NODE.format("kid"))
    assert kid.get_attribute("data-phase") == "Requested"
    assert "requested" in (kid.get_attribute("class") or "").split()
    assert page.locator("svg#graph path.edge.spawn").count() == 1  # waiter -> kid, dashed
    # nodes already drawn stay where they were
    after = page.evaluate(POSITIONS_JS)
    assert {n: after[n] for n in before} == before, (before, after)


# --- 3. waiting for input, answered from the inbox --------------------------------------

# what an agent writes is text on the page, never markup
QUESTION = 'Which colour do you want? <img src="x" class="xss"><b class="xss">now</b>'


@pytest.mark.slow
def test_an_agent_waiting_for_input_is_answered_from_the_inbox(
        repo: Path, ui: Callable[..., Server], session: Callable[[Server], Session]) -> None:
    task = "; ".join([report({"state": "waiting", "message": QUESTION}),
                      "IFS= read -r line", 'echo "$line" > GOT', "sleep 300"])
    local_grove(repo, agent("asker", task) + agent("idle", "sleep 300"))
    commit(repo)
    box = repo / ".engine" / "inbox" / G / "asker"
    # taken in by a pass (status alone shows a report no pass has taken yet, and an answer
    # cannot clear what was never recorded)
    until(lambda: apply(repo) and status(repo).get("asker", {}).get("conditions")
          and not list(box.glob("req-*")), 60, "asker's WaitingForInput condition")
    s = session(ui())
    page = s.open(f"/inbox/{G}", 'div.waiting-item[data-agent="asker"]')
    item = page.locator('div.waiting-item[data-agent="asker"]')
    assert item.locator("p.message").inner_text().strip() == QUESTION
    assert page.locator(".xss").count() == 0
    assert page.locator("div.waiting-item").count() == 1  # idle waits for nobody
    assert page.locator("section#approvals p.empty").count() == 1
    page.wait_for_function(
        "() => document.getElementById('inbox-count').textContent.trim() === '1'")
    item.locator("textarea.reply").fill("blue, please")
    item.locator("button.send").click()
    page.wait_for_selector("#flash p.ok")
    got = workspace(repo, "asker") / "GOT"
    until(lambda: got.exists() and got.read_text() == "blue, please\n", 20,
          "the reply in the agent's GOT file")
    page.wait_for_selector('div.waiting-item[data-agent="asker"]', state="detached")
    page.wait_for_selector("section#waiting p.empty")
    assert not status(repo)["asker"]["conditions"]


# --- 4. spawn approval from the page ----------------------------------------------------

LEAD = """\
    - name: lead
      task: |
        engine spawn helper --task 'echo helping; sleep 300'
        sleep 300
"""


@pytest.mark.slow
def test_a_spawn_is_approved_from_the_inbox(
        repo: Path, ui: Callable[..., Server], session: Callable[[Server], Session]) -> None:
    approval_grove(repo, LEAD, commit=True)
    until(lambda: apply(repo) and requests(repo, "lead"), 60, "lead's spawn request")
    [rid] = requests(repo, "lead")
    apply(repo)  # the gate accepts it; now it waits for a person
    plan = json.loads(engine_proc(repo, "plan", "--json").stdout)
    [req] = plan["groves"][0]["spawnRequests"]
    assert req["approval"] == "pending"
    s = session(ui())
    page = s.open(f"/inbox/{G}", f'div.approval[data-request="{rid}"]')
    item = page.locator(f'div.approval[data-request="{rid}"]')
    text = item.inner_text()
    assert "lead" in text and "helper" in text, text
    assert item.locator("pre.task").inner_text().strip() == "echo helping; sleep 300"
    assert item.locator("code.digest").inner_text().strip() == req["digest"]
    assert not (repo / f"groves/{G}/spawned.yaml").exists()
    item.locator("button.approve").click()
    page.wait_for_selector("#flash p.ok")
    docs = [d for d in yaml.safe_load_all((repo / f"groves/{G}/spawned.yaml").read_text())
            if d]
    assert [(d["metadata"]["name"], d["spec"]["spawnedBy"], d["spec"]["spawnRequest"])
            for d in docs] == [("helper", "lead", rid)], docs
    assert "Spawn-Approved-By: alice@example.com" in git(repo, "log", "-1", "--format=%B")
    page.wait_for_selector(f'div.approval[data-request="{rid}"]', state="detached")
    page.wait_for_selector("section#approvals p.empty")


# --- 5. refused without the token, the session, the right Host or origin --------------

def csp_ok(headers: Any) -> None:
    csp = headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert "frame-ancestors 'none'" in csp and "form-action 'none'" in csp, csp


def test_requests_without_token_session_host_or_origin_are_refused(
        repo: Path, ui: Callable[..., Server]) -> None:
    """The token is traded once for a session that only the dashboard's own pages send
    (a header, never a cookie); data and actions need it, from this origin and Host."""
    import httpx

    local_grove(repo, agent("idle", "sleep 300"))
    apply(repo)
    until(lambda: phases(repo) == {"idle": "Running"}, 30, "idle to run")
    srv = ui()
    base = srv.ip_base
    port = urllib.parse.urlsplit(base).port
    name = {"Host": srv.host}
    # no data without the session: the API refuses, the pages are empty shells
    for path in (f"/api/status?grove={G}", f"/api/inbox?grove={G}", f"/api/plan?grove={G}",
                 f"/api/agent?grove={G}&agent=idle", f"/api/agent/logs?grove={G}&agent=idle",
                 f"/api/stream?grove={G}", f"/api/stream?grove={G}&session=x",
                 f"/api/history?grove={G}"):
        r = httpx.get(base + path, headers={**name, **({"X-Grove-Session": "x"}
                                                       if "x" in path else {})})
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert "idle" not in r.text, (path, r.text[:200])
    for path in (f"/grove/{G}", f"/agent/{G}/idle", f"/inbox/{G}"):
        r = httpx.get(base + path, headers=name)
        assert r.status_code == 200 and "sleep 300" not in r.text, (path, r.status_code)
        assert "set-cookie" not in r.headers
        csp_ok(r.headers)
    # a wrong token is refused and hands out nothing
    for bad in ("0" * len(srv.token), srv.token[:-1], srv.token + "x", ""):
        r = httpx.get(base + "/?token=" + bad, headers=name)
        assert r.status_code == (401 if bad else 303), (bad, r.status_code)  # "": no token
        assert 'name="grove-session" content=""' in r.text or not bad, r.text[:300]
        assert "set-cookie" not in r.headers
    # the right one gives the sign-in page: a session value, and the address without it
    r = httpx.get(base + f"/grove/{G}", params={"token": srv.token}, headers=name)
    assert r.status_code == 200
    csp_ok(r.headers)
    assert "set-cookie" not in r.headers  # other ports of 127.0.0.1 would receive a cookie
    m = re.search(r'<meta name="grove-session" content="([^"]+)"', r.text)
    assert m and srv.token not in r.text, r.text[:500]
    session = {"X-Grove-Session": m.group(1)}
    # the address signs in one browser: used again, it hands out nothing
    r = httpx.get(base + f"/grove/{G}", params={"token": srv.token}, headers=name)
    assert r.status_code == 401 and m.group(1) not in r.text
    with httpx.Client(base_url=base, headers=name) as c:
        r = c.get(f"/api/status?grove={G}", headers=session)
        assert r.status_code == 200
        csp_ok(r.headers)
        assert [a["name"] for a in r.json()["grove"]["agents"]] == ["idle"]
        # another Host (a DNS-rebinding page): refused, session or not
        for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.2:{port}",
                     f"127.0.0.1:{port}", f"localhost:{port}"):
            r = c.get(f"/api/status?grove={G}", headers={**session, "Host": host})
            assert r.status_code == 421 and "idle" not in r.text, (host, r.status_code)
        stop = {"action": "stop", "grove": G, "agent": "idle"}
        refused = [
            ({}, 401),  # no session
            ({"X-Grove-Session": m.group(1)[:-1] + "x"}, 401),  # a wrong one
            ({**session, "Host": f"attacker.example:{port}"}, 421),
            ({**session, "Origin": "http://attacker.example"}, 403),  # another site's page
            ({**session, "Origin": f"http://127.0.0.1:{port + 1}"}, 403),  # another port
            ({**session, "Sec-Fetch-Site": "cross-site"}, 403),
        ]
        for headers, code in refused:
            r = c.post("/api/action", json=stop, headers=headers)
            assert r.status_code == code, (headers, r.status_code, r.text)
            if code != 421:  # the Host check answers before anything knows it is the API
                assert r.json()["error"].startswith("error: "), r.text
        # a body a plain HTML form could send is no action either
        r = c.post("/api/action", content=json.dumps(stop),
                   headers={**session, "Content-Type": "text/plain"})
        assert r.status_code == 403, r.status_code
        time.sleep(1)
        assert phases(repo) == {"idle": "Running"}  # nothing of the above stopped it
        # and the same request, done right, does
        r = c.post("/api/action", json=stop,
                   headers={**session, "Origin": srv.base, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        until(lambda: phases(repo) == {"idle": "Stopped"}, 20, "idle to stop")
    # it serves until SIGTERM, then ends at once, leaving nothing behind (saved plans)
    started = time.monotonic()
    srv.stop()
    assert srv.proc.returncode in (0, 130, -signal.SIGTERM), srv.text()  # 130: as Ctrl-C
    assert time.monotonic() - started < 5
    assert not list(srv.tmp.iterdir()), list(srv.tmp.rglob("*"))


# --- 6. every page: content, screenshots, apply from the plan, live updates -------------

DEMO = """\
    - name: lead
      task: |
        echo "planning the work"
        engine spawn parser --wait --task 'echo "parsing input"; sleep 300'
        engine spawn reviewer --task 'Review the parser change and report back.'
        sleep 300
    - name: asker
      task: {asker}
    - name: build
      task: |
        echo "compiling 12 modules"
        printf 'ok\\n' > out.txt
        git add out.txt && git commit -qm "build: record the build result"
        echo "build done"
    - name: test
      dependsOn: [build]
      task: |
        echo "running tests"
        sleep 300
"""
ASKER = "; ".join([
    report({"usage": {"inputTokens": 12400, "outputTokens": 830, "costUSD": 0.42,
                      "turns": 3}}),
    report({"state": "waiting", "message": "Should the parser accept tabs? (yes/no)"}),
    "IFS= read -r line", 'echo "$line" > ANSWER', "sleep 300"])
DOCS = """\
    - name: docs
      task: "echo documenting; sleep 300"
"""


def demo_grove(repo: Path) -> str:
    """The demo: a lead that spawns (one child approved, one awaiting approval), an agent
    waiting for input, a build with a commit and a test after it. Returns the request id of
    the spawn still waiting for approval."""
    approval_grove(repo, DEMO.format(asker=json.dumps(ASKER)), commit=True)
    rid = ""

    def settled() -> bool:
        nonlocal rid
        apply(repo)
        plan = json.loads(engine_proc(repo, "plan", "--json").stdout)
        waiting = {r["agent"]: r for r in plan["groves"][0]["spawnRequests"]
                   if r.get("approval") == "pending"}
        if "parser" in waiting:
            p = engine_proc(repo, "approve", waiting["parser"]["request"],
                            "--digest", waiting["parser"]["digest"])
            assert p.returncode == 0, p.stderr
        now = status(repo)
        rid = waiting.get("reviewer", {}).get("request", "")
        return ("reviewer" in waiting and now.get("parser", {}).get("phase") == "Running"
                and bool(now["asker"]["conditions"]) and now["test"]["phase"] == "Running"
                and now["build"]["phase"] == "Succeeded")

    until(settled, 90, "the demo grove to settle")
    return rid


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_page_shows_its_part_and_is_captured(
        repo: Path, ui: Callable[..., Server], session: Callable[[Server], Session],
        shots: Path) -> None:
    rid = demo_grove(repo)
    with (repo / f"groves/{G}/grove.yaml").open("a") as f:
        f.write(DOCS)  # a change in the working tree, for the plan
    s = session(ui())
    page = s.page

    def shot(name: str) -> None:
        page.wait_for_selector("#live.live")
        page.screenshot(path=str(shots / f"ui-{name}.png"))

    everyone = {"lead", "parser", "asker", "build", "test", "docs", "reviewer"}
    s.open(f"/grove/{G}", NODE.format("reviewer"))
    page.wait_for_function(f"() => document.querySelectorAll('svg#graph g.node').length "
                           f"=== {len(everyone)}")
    assert {n for n, _ in page_nodes(page)} == everyone
    assert page.get_attribute(NODE.format("reviewer"), "data-phase") == "Requested"
    assert page.get_attribute(NODE.format("docs"), "data-phase") == "Pending"
    assert "waiting" in (page.get_attribute(NODE.format("asker"), "class") or "").split()
    assert "$0.42" in page.inner_text('table#agents tr[data-agent="asker"]')
    page.wait_for_function(  # the nav's inbox badge, on every page: asker and reviewer
        "() => document.getElementById('inbox-count').textContent.trim() === '2'")
    shot("grove")

    s.open(f"/agent/{G}/build", "section#summary")
    page.wait_for_function("() => document.querySelector('pre#logs').textContent"
                           ".includes('compiling 12 modules')")
    page.wait_for_function("() => document.querySelector('div#commits').textContent"
                           ".includes('build: record the build result')")
    page.wait_for_function("() => document.querySelector('pre#diff').textContent"
                           ".includes('out.txt')")
    page.wait_for_selector("div#explain table tr")
    assert "Succeeded" in page.inner_text("section#summary")
    assert page.locator("button.action[data-action]").count() == 4
    shot("agent")

    s.open(f"/inbox/{G}", f'div.approval[data-request="{rid}"]')
    page.wait_for_selector('div.waiting-item[data-agent="asker"]')
    assert "Review the parser change" in page.inner_text(
        f'div.approval[data-request="{rid}"] pre.task')
    page.wait_for_function(
        "() => document.getElementById('inbox-count').textContent.trim() === '2'")
    shot("inbox")

    s.open(f"/plan/{G}", 'tr.change[data-agent="docs"]')
    assert page.get_attribute('tr.change[data-agent="docs"]', "data-action") == "create"
    changes = page.locator('tr.change:not([data-action="no-op"])')
    assert changes.count() == 1, page.inner_text("table#plan-changes")
    assert "reviewer" in page.inner_text("main")  # the spawn request waiting for approval
    assert page.is_enabled("button#apply")
    page.fill("input#base", "HEAD")
    page.click("button#compare")
    page.wait_for_function("() => document.querySelector('pre#topology').textContent"
                           ".includes('docs')")
    shot("plan")

    s.open(f"/history/{G}", "table#history tr.entry")
    history = page.inner_text("table#history")
    assert "parser" in history and "lead" in history, history
    assert page.locator("table#history tr.entry").count() >= 2
    shot("history")

    # apply from the plan page: a modal of our own, the job's output, then a fresh plan
    s.open(f"/plan/{G}", 'tr.change[data-agent="docs"]')
    page.click("button#apply")
    page.wait_for_selector("div#confirm button#confirm-yes")
    assert "1 create" in page.inner_text("div#confirm")  # the plan's summary
    page.click("button#confirm-yes")
    page.wait_for_selector("pre#job-output")
    page.wait_for_selector('tr.change[data-agent="docs"][data-action="create"]',
                           state="detached", timeout=60_000)
    assert page.is_disabled("button#apply")
    until(lambda: status(repo)["docs"]["phase"] == "Running", 30, "docs to run")
    assert "docs" in page.inner_text("pre#job-output")

    # a change reaches the open grove page: stop an agent with the CLI
    s.open(f"/grove/{G}", NODE.format("test"))
    page.wait_for_selector("#live.live")
    page.evaluate("""() => { window.__changed = 0; new MutationObserver(() => {
        const n = document.querySelector('svg#graph g.node[data-agent="test"]');
        if (!window.__changed && n && n.getAttribute('data-phase') === 'Stopped')
          window.__changed = Date.now(); }).observe(document.getElementById('graph'),
        {attributes: true, childList: true, subtree: true}); }""")
    started = page.evaluate("Date.now()")
    p = engine_proc(repo, "stop", "test")
    assert p.returncode == 0, p.stderr
    done = page.evaluate("Date.now()")
    changed = page.wait_for_function("() => window.__changed", timeout=15_000).json_value()
    measured(shots, f"live update: the page showed Stopped {changed - started} ms after "
                    f"`engine stop` started (the command took {done - started} ms)")

    # the agent page counts the work on the branch as `engine status` does
    assert status(repo)["build"]["ahead"] == 1
    s.open(f"/agent/{G}/build", "section#summary")
    page.wait_for_function("() => document.querySelector('section#summary').textContent"
                           ".includes('1 ahead')", timeout=5_000)


@pytest.mark.slow
def test_a_500_agent_grove_draws(tmp_path: Path, ui: Callable[..., Server],
                                 session: Callable[[Server], Session], shots: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    searchable(big)
    git(big, "init", "-q", "-b", "main")
    agents = "".join(f"    - name: a{i:03d}\n      task: 'true'\n"
                     + (f"      dependsOn: [a{i - 1:03d}]\n" if i % 10 else "")
                     for i in range(500))
    write_grove(big, "big", LOCAL_GROVE_BIG.format(agents=agents))
    git(big, "add", "-A")
    git(big, "commit", "-qm", "big")
    s = session(ui("big", big))
    page = s.page
    page.add_init_script(RENDERED_JS)  # the moment body gets data-rendered, in page time
    s.open("/grove/big", "body[data-rendered]")
    page.wait_for_function("() => window.__rendered !== null")
    assert len(page_nodes(page)) == 500
    assert {p for _, p in page_nodes(page)} == {"Pending"}
    t = page.evaluate("""() => ({rendered: window.__rendered,
        html: performance.getEntriesByType('navigation')[0].responseEnd,
        loaded: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd})""")
    measured(shots, f"grove page, 500 agents: {t['rendered']:.0f} ms (navigation start to "
                    f"body[data-rendered]; HTML in at {t['html']:.0f} ms, DOMContentLoaded "
                    f"at {t['loaded']:.0f} ms; the rest is the status document and drawing)")
    # the graph alone, drawn again from the same document into fresh SVGs (best of 3)
    js = page.evaluate("""async () => {
        const p = await (await fetch('/api/status?grove=big', {headers: {
            'X-Grove-Session': localStorage.getItem('grove-session')}})).json();
        const took = [];
        for (let i = 0; i < 3; i++) {
          const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
          document.body.appendChild(svg);
          const t0 = performance.now();
          new window.GroveGraph(svg, {grove: 'big'}).update(p);
          svg.getBBox();  // and its layout
          took.push(performance.now() - t0);
          svg.remove();
        }
        return Math.min(...took); }""")
    measured(shots, f"graph of 500 agents, JS alone (best of 3): {js:.0f} ms")


RENDERED_JS = """window.__rendered = null;
new MutationObserver(() => {
  if (window.__rendered === null && document.body && document.body.hasAttribute('data-rendered'))
    window.__rendered = performance.now();
}).observe(document, {attributes: true, subtree: true, attributeFilter: ['data-rendered']});"""


LOCAL_GROVE_BIG = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: big}}
spec:
  defaults: {{profile: local, harness: shell}}
  policy: {{maxAgents: 500}}
  profiles:
    local: {{runtime: local}}
  agents:
{agents}"""
