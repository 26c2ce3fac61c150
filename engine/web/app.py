"""The web UI's server: pages, JSON API, live stream, and the guard in front of them.

Built by `engine ui` (engine/commands/ui.py), which binds the socket and runs uvicorn.

The guard (`Guard`, an ASGI middleware) runs before every route:
- the Host header must name the address the server was started on (a DNS-rebinding page
  cannot reach it);
- the access token, printed at start, is traded in the URL (`?token=`) for a session
  value that the sign-in page keeps in the origin's localStorage (not a cookie: cookies
  are shared by every port of 127.0.0.1) and replaces the address that carried the token;
- every API request needs that session in `X-Grove-Session` (the stream: in its URL);
  pages and assets carry no data. A POST also needs a JSON body and no foreign Origin or
  cross-site fetch metadata;
- every response carries a strict Content-Security-Policy (scripts and styles only from
  this server, nothing inline) and no-store caching.

Live updates: one `Feed` per grove recomputes the status payload when the engine's state
changes (watchdog on the state directory and the grove's manifests) or at least every
`TICK` seconds (processes end without writing a file), and the stream pushes it to every
open page as a server-sent event.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import collections
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets as pysecrets
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engine import observe, paths
from engine.errors import EngineError
from engine.web import actions
from engine.web.data import EventTail, Reader

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
TICK = 1.0  # seconds between refreshes of a grove's status when nothing signals a change
PING = 15.0  # seconds between keep-alive comments on the stream
WAKE = 0.5  # seconds a stream waits before it looks whether the server is stopping
MAX_BODY = 128 * 1024  # bytes of an action request
MAX_SESSIONS = 16  # browsers signed in at once (the oldest is signed out)
MAX_LOG_STREAMS = 8  # `engine logs -f` children at once (one per open agent page)
LOG_CHUNK = 64 * 1024  # bytes of a log read and sent at a time
_NEXT = re.compile(r"/[A-Za-z0-9/_.=&?-]{0,400}")  # where sign-in goes on: this server only
ASSETS = ("app.css", "graph.js", "app.js", "signin.js")
MAX_PLANS = 20  # plans shown (and kept for their Apply button) at once
CHANGES = {"created", "modified", "moved", "deleted", "closed"}  # file events that wake

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """Host check, token to session, session check, same-origin check on actions,
    security headers."""

    def __init__(self, app: ASGIApp, token: str, hosts: set[str] | None, port: int
                 ) -> None:
        """`hosts`: the Host values answered (None: any, for a server listening on a
        network address, which people reach by names it cannot know)."""
        self.app, self.token, self.hosts, self.port = app, token, hosts, port
        self.sessions: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def sign_in(self, token: str) -> str:
        """A new session for the printed token, once: "" for a wrong or used token."""
        with self._lock:
            if not self.token or not hmac.compare_digest(token.encode(),
                                                         self.token.encode()):
                return ""
            self.token = ""  # the address printed signs in one browser
            session = pysecrets.token_urlsafe(32)
            self.sessions[session] = None
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return session

    def valid(self, given: str) -> bool:
        with self._lock:
            return bool(given) and any(hmac.compare_digest(given.encode(), s.encode())
                                       for s in self.sessions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return

        async def send_secure(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [h for h in message.get("headers", [])
                                      if h[0].lower() not in dict(HEADERS)] + HEADERS
            await send(message)

        refusal = self.check(scope)
        if isinstance(refusal, Response):
            await refusal(scope, receive, send_secure)
            return
        await self.app(scope, receive, send_secure)

    def check(self, scope: Scope) -> Response | None:
        """None to serve the request, else the refusal (or the sign-in page).

        The pages and assets carry no data and no secret: they are served to whoever
        names this server's host. Data and actions (`/api/`) need the session, which only
        the sign-in page hands out, in exchange for the printed token. The session travels
        in the X-Grove-Session header (the stream: its URL), never in a cookie: a browser
        sends cookies to every port of 127.0.0.1, so another program listening there (an
        agent's preview server) would receive one."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            why = "misdirected request: this server answers only to the address engine ui " \
                  "printed"
            if str(scope["path"]).startswith("/api/"):
                return JSONResponse({"ok": False, "error": f"error: {why}"}, 421)
            return PlainTextResponse(why, 421)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        path = "/" + str(scope["path"]).lstrip("/")  # never //host: not another site
        if "service-worker" in headers:  # nothing here ever installs one
            return PlainTextResponse("no service worker here", 403)
        if "token" in query:
            session = self.sign_in(query["token"])
            rest = urlencode({k: v for k, v in query.items() if k != "token"})
            nxt = path + (f"?{rest}" if rest else "")
            if not _NEXT.fullmatch(nxt):
                nxt = "/"
            # a used token: the page goes on with the session this browser already has,
            # or says the address was used
            resp = HTMLResponse(_templates().get_template("signin.html").render(
                session=session, next=nxt, sri=_sri()), 200 if session else 401)
            return resp
        if not path.startswith("/api/"):
            if scope["method"] not in ("GET", "HEAD"):
                return PlainTextResponse("method not allowed", 405)
            return None
        given = headers.get("x-grove-session", "")
        if not given and path.endswith("/stream"):  # EventSource sets no header
            given = query.get("session", "")
        if not self.valid(given):
            return _denied(path)
        if scope["method"] not in ("GET", "HEAD"):
            if scope["method"] != "POST":
                return JSONResponse({"ok": False, "error": "error: method not allowed"}, 405)
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            if (origin is not None and origin.lower() != f"http://{host}") or \
                    site not in (None, "same-origin") or \
                    not headers.get("content-type", "").startswith("application/json"):
                return JSONResponse({"ok": False, "error": "error: refused: not a request "
                                     "of this dashboard's own pages"}, 403)
            try:
                size = int(headers["content-length"])
            except (KeyError, ValueError):
                return JSONResponse({"ok": False, "error": "error: a request needs its "
                                     "Content-Length"}, 411)
            if size > MAX_BODY:
                return JSONResponse({"ok": False, "error": "error: request too large"}, 413)
        return None


def _denied(path: str) -> Response:
    if path.startswith("/api/"):
        return JSONResponse({"ok": False, "error": "error: not signed in: open the address "
                             "engine ui printed"}, 401)
    html = _templates().get_template("denied.html").render()
    return HTMLResponse(html, 401)


_ENV: jinja2.Environment | None = None
_SRI: dict[str, str] = {}


def _sri() -> dict[str, str]:
    """Subresource-integrity hashes of the assets, so a page runs only these exact files
    (whatever a cache may hold)."""
    if not _SRI:
        for name in ASSETS:
            digest = hashlib.sha384((HERE / "static" / name).read_bytes()).digest()
            _SRI[name] = "sha384-" + base64.b64encode(digest).decode()
    return _SRI


def _templates() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                  autoescape=True)
    return _ENV


class Feed:
    """One grove's live status: recomputed on a change signal or every TICK seconds; each
    new payload (a different document) gets the next version and wakes the streams."""

    def __init__(self, reader: Reader, grove: str) -> None:
        self.reader, self.grove = reader, grove
        self.version = 0
        self.payload: dict[str, Any] | None = None
        self.text = ""
        self.error = ""
        self.changed_at = 0.0
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._stop = False
        self._tail = EventTail(reader.root, grove)
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"feed-{grove}")
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def current(self, timeout: float = 30.0) -> dict[str, Any]:
        with self._cond:
            self._cond.wait_for(lambda: self.payload is not None or bool(self.error),
                                timeout)
        if self.payload is None:
            raise EngineError(self.error or f"grove {self.grove}: status not ready")
        return self.payload

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters.append((asyncio.get_running_loop(), ev))
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._waiters = [(lp, e) for lp, e in self._waiters if e is not ev]

    def _loop(self) -> None:
        while not self._stop:
            try:
                payload = self.reader.status(self.grove, tail=self._tail)
                text = json.dumps(payload, sort_keys=True)
                if text != self.text:
                    with self._cond:
                        self.version += 1
                        payload["version"] = self.version
                        self.payload, self.text, self.error = payload, text, ""
                        self.changed_at = time.time()
                        self._cond.notify_all()
                    for loop, ev in list(self._waiters):
                        loop.call_soon_threadsafe(ev.set)
            except EngineError as e:
                with self._cond:
                    self.error = e.summary
                    self._cond.notify_all()
            except Exception as e:  # a bug must not end the feed; the page shows it
                with self._cond:
                    self.error = f"internal error: {type(e).__name__}: {e}"
                    self._cond.notify_all()
            self._wake.wait(TICK)
            self._wake.clear()
            time.sleep(0.02)  # a burst of file events is one refresh


class Server:
    """The app's state: reader, feeds, jobs, saved plans, and the change watcher."""

    def __init__(self, root: Path, groves: list[str], token: str, hosts: set[str] | None,
                 port: int) -> None:
        self.root = root
        self.reader = Reader(root)
        self.groves = groves
        self.feeds: dict[str, Feed] = {}
        self.plans = Path(tempfile.mkdtemp(prefix="engine-ui-"))  # 0700, this user's
        self.jobs = actions.Jobs(root, self.poke_all)
        routes = [
            Route("/", self.home),
            Route("/grove/{grove}", self.page("grove")),
            Route("/inbox/{grove}", self.page("inbox")),
            Route("/plan/{grove}", self.page("plan")),
            Route("/history/{grove}", self.page("history")),
            Route("/agent/{grove}/{agent}", self.page("agent")),
            Route("/api/groves", self.api_groves),
            Route("/api/status", self.api_status),
            Route("/api/stream", self.api_stream),
            Route("/api/inbox", self.api_inbox),
            Route("/api/plan", self.api_plan),
            Route("/api/topology", self.api_topology),
            Route("/api/history", self.api_history),
            Route("/api/events", self.api_events),
            Route("/api/agent", self.api_agent),
            Route("/api/agent/logs/stream", self.api_log_stream),
            Route("/api/agent/{what}", self.api_agent_text),
            Route("/api/action", self.api_action, methods=["POST"]),
            Route("/api/job/{job}", self.api_job),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        self.starlette = Starlette(routes=routes, exception_handlers={
            _HTTPError: _refused, EngineError: _refused})
        self.guard = Guard(self.starlette, token, hosts, port)
        self._observer: Any = None
        self._inbox: dict[str, tuple[int, dict[str, Any]]] = {}
        self.closing = threading.Event()  # set when the server stops: streams end
        self._children: set[int] = set()  # `engine logs` processes of open streams
        self._log_streams = 0
        self._inbox_lock = asyncio.Lock()

    # -- change signals -----------------------------------------------------------------

    def watch(self) -> None:
        """Wake the feeds when the engine's state or a grove's manifests change."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # the feeds still refresh every TICK
            return
        server = self

        class Poke(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in CHANGES:  # not opens and reads (the feed's own)
                    server.poke_all()

        obs = Observer()
        state = paths.state(self.root)
        dirs = [(state, False), (state / "state", False)]
        for g in self.groves:  # the manifests, and agents' requests (as the controller)
            dirs += [(self.root / "groves" / g, False), (state / "inbox" / g, True)]
        for d, recursive in dirs:
            if d.is_dir():
                obs.schedule(Poke(), str(d), recursive=recursive)
        obs.daemon = True
        obs.start()
        self._observer = obs

    def poke_all(self) -> None:
        for f in list(self.feeds.values()):
            f.poke()

    def close(self) -> None:
        self.closing.set()
        for pid in list(self._children):  # a stream cut off at shutdown: its child too
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for f in self.feeds.values():
            f.stop()
        if self._observer is not None:
            self._observer.stop()
        for p in self.plans.glob("*.json"):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.plans.rmdir()

    def feed(self, grove: str) -> Feed:
        if grove not in self.groves:
            raise _NotFound(f"error: grove {grove}: not served here (groves: "
                            f"{', '.join(self.groves)})")
        if grove not in self.feeds:
            self.feeds[grove] = Feed(self.reader, grove)
        return self.feeds[grove]

    # -- pages --------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"/grove/{self.groves[0]}", 303)

    def page(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def render(request: Request) -> Response:
            grove = request.path_params["grove"]
            agent = request.path_params.get("agent", "")
            if grove not in self.groves or (agent and not actions.NAME.fullmatch(agent)):
                return HTMLResponse("not found", 404)
            html = _templates().get_template(f"{name}.html").render(
                page=name, grove=grove, groves=self.groves, agent=agent, sri=_sri())
            return HTMLResponse(html)
        return render

    # -- API ----------------------------------------------------------------------------

    def _grove(self, request: Request) -> str:
        g = request.query_params.get("grove", "")
        self.feed(g)
        return g

    def _agent(self, request: Request) -> str:
        a = request.query_params.get("agent", "")
        if not actions.NAME.fullmatch(a):
            raise _NotFound("error: agent: not a valid name")
        return a

    async def api_groves(self, request: Request) -> Response:
        return JSONResponse({"groves": self.groves})

    async def api_status(self, request: Request) -> Response:
        f = self.feed(request.query_params.get("grove", ""))
        return JSONResponse(await asyncio.to_thread(f.current))

    async def api_stream(self, request: Request) -> Response:
        f = self.feed(request.query_params.get("grove", ""))

        async def events() -> AsyncIterator[bytes]:
            ev = f.subscribe()
            try:
                sent, told, quiet = -1, "", 0.0
                while not self.closing.is_set():
                    if f.payload is not None and f.version != sent:
                        sent = f.version
                        data = json.dumps(f.payload, separators=(",", ":"))
                        yield f"event: status\ndata: {data}\n\n".encode()
                    elif f.error and f.error != told:
                        told = f.error
                        yield f"event: failure\ndata: {json.dumps(f.error)}\n\n".encode()
                    ev.clear()
                    try:
                        await asyncio.wait_for(ev.wait(), WAKE)
                        quiet = 0.0
                    except TimeoutError:
                        quiet += WAKE
                        if quiet >= PING:
                            quiet = 0.0
                            yield b"event: ping\ndata: {}\n\n"
            finally:
                f.unsubscribe(ev)

        return _Stream(events(), media_type="text/event-stream",
                       headers={"X-Accel-Buffering": "no"})

    async def api_inbox(self, request: Request) -> Response:
        """Computed once per status version (it plans, to find what awaits approval),
        however many pages ask."""
        g = self._grove(request)
        async with self._inbox_lock:
            status = await asyncio.to_thread(self.feeds[g].current)
            hit = self._inbox.get(g)
            if hit is None or hit[0] != status["version"]:
                hit = (status["version"],
                       await asyncio.to_thread(self.reader.inbox, g, status))
                self._inbox[g] = hit
        return JSONResponse(hit[1])

    async def api_plan(self, request: Request) -> Response:
        g = self._grove(request)
        doc = await asyncio.to_thread(self.reader.plan, g)
        plan_id = pysecrets.token_hex(8)
        await asyncio.to_thread(self.reader.save_plan, doc, self.plans, plan_id)
        with contextlib.suppress(OSError):  # another request's clean-up got there first
            saved = sorted(self.plans.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
            for old in saved[:-MAX_PLANS]:  # an older page's Apply says reload
                old.unlink(missing_ok=True)
        return JSONResponse({"planId": plan_id, "plan": doc})

    async def api_topology(self, request: Request) -> Response:
        g = self._grove(request)
        base = request.query_params.get("base", "") or "HEAD"
        head = request.query_params.get("head", "")
        for ref in (base, head):
            if ref and not _REF.fullmatch(ref):
                raise _BadRequest(f"error: {ref[:60]!r}: not a git revision name")
        argv = ["plan", f"--grove={g}", f"--base={base}", "--format=markdown"]
        if head:
            argv.append(f"--head={head}")
        res = await asyncio.to_thread(actions.run_cli, self.root, argv)
        if res.code not in (0, 2):
            raise _BadRequest(res.line())
        return JSONResponse({"text": res.out})

    async def api_history(self, request: Request) -> Response:
        g = self._grove(request)
        res = await asyncio.to_thread(actions.run_cli, self.root,
                                      ["history", f"--grove={g}", "--json"])
        if res.code:
            raise _BadRequest(res.line())
        return JSONResponse(_json(res.out))

    async def api_events(self, request: Request) -> Response:
        g = self._grove(request)
        return JSONResponse({"events": await asyncio.to_thread(self.reader.events, g)})

    async def api_agent(self, request: Request) -> Response:
        g, a = self._grove(request), self._agent(request)
        status = await asyncio.to_thread(self.feeds[g].current)
        rows = [r for r in status["grove"]["agents"] if r["name"] == a]
        if not rows:
            raise _NotFound(f"error: agent {g}/{a}: not found")
        explain, cost, commits, work = await asyncio.gather(
            asyncio.to_thread(actions.run_cli, self.root, ["explain", f"{g}/{a}", "--json"]),
            asyncio.to_thread(actions.run_cli, self.root, ["cost", f"{g}/{a}", "--json"]),
            asyncio.to_thread(self._commits, g, a, rows[0]),
            asyncio.to_thread(observe.work_of, self.root, self.reader.grove(g), a))
        row = dict(rows[0])  # the live rows leave out workspace counts (a git call each)
        row["dirty"], row["ahead"] = (work.dirty, work.ahead) if work else (0, 0)
        return JSONResponse({
            "row": row, "commits": commits,
            "explain": _json(explain.out) if explain.code == 0 else
            {"error": explain.line()},
            "cost": _json(cost.out) if cost.code == 0 else None})

    def _commits(self, g: str, a: str, row: dict[str, Any]) -> list[dict[str, str]]:
        from engine.trust.git import run as git

        branch = row.get("branch") or ""
        if not branch:
            return []
        base = self.reader.grove(g).base_ref or "HEAD"
        out = git(self.root, "log", "--format=%H%x1f%s%x1f%an%x1f%aI", "-n", "100",
                  f"{base}..refs/heads/{branch}", "--", check=False)
        commits = []
        for line in out.splitlines():
            parts = line.split("\x1f")
            if len(parts) == 4:
                commits.append({"sha": parts[0], "subject": parts[1], "author": parts[2],
                                "time": parts[3]})
        return commits

    async def api_agent_text(self, request: Request) -> Response:
        g, a = self._grove(request), self._agent(request)
        what = request.path_params["what"]
        argv = {"logs": ["logs", f"{g}/{a}"], "screen": ["look", f"{g}/{a}"],
                "diff": ["diff", f"{g}/{a}"],
                "egress": ["egress", f"{g}/{a}", "--json", "--tail=500"]}.get(what)
        if argv is None:
            raise _NotFound(f"error: {what[:40]!r}: nothing by that name")
        res = await asyncio.to_thread(actions.run_cli, self.root, argv, None, 60.0)
        if what == "egress":
            if res.code:
                return JSONResponse({"records": [], "error": res.line()})
            doc = _json(res.out)
            return JSONResponse({"records": doc if isinstance(doc, list) else
                                 doc.get("records", [])})
        if res.code:
            return JSONResponse({"text": "", "error": res.line()})
        return JSONResponse({"text": res.out})

    async def api_log_stream(self, request: Request) -> Response:
        """An agent's log as it grows: `engine logs -f` in a child process, its output
        relayed as `chunk` events (JSON strings: the text as it came) until the agent
        ends (`end`) or the page goes; the child is ended with the page."""
        g, a = self._grove(request), self._agent(request)
        if self._log_streams >= MAX_LOG_STREAMS:
            raise _BadRequest(f"error: {MAX_LOG_STREAMS} log streams are open already; "
                              "close an agent page")

        async def chunks() -> AsyncIterator[bytes]:
            # the child starts with the stream, not before: a page gone before its first
            # byte leaves no process behind
            if self._log_streams >= MAX_LOG_STREAMS:
                yield b"event: end\ndata: busy\n\n"
                return
            self._log_streams += 1
            try:
                follow = _Follow(self.root, ["logs", f"{g}/{a}", "--follow"],
                                 asyncio.get_running_loop())
            except OSError as e:
                self._log_streams -= 1
                text = json.dumps(f"error: engine logs: {e.strerror}\n")
                yield f"event: chunk\ndata: {text}\n\nevent: end\ndata: 1\n\n".encode()
                return
            self._children.add(follow.proc.pid)
            decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                quiet = 0.0
                while not self.closing.is_set():
                    try:
                        data = await asyncio.wait_for(follow.get(), WAKE)
                    except TimeoutError:
                        quiet += WAKE
                        if quiet >= PING:  # a quiet agent: a page that is gone shows up
                            quiet = 0.0
                            yield b": ping\n\n"
                        continue
                    quiet = 0.0
                    text = decode.decode(data, final=not data)
                    if text:
                        yield f"event: chunk\ndata: {json.dumps(text)}\n\n".encode()
                    if not data:
                        yield f"event: end\ndata: {follow.wait()}\n\n".encode()
                        break
            finally:
                self._log_streams -= 1
                self._children.discard(follow.proc.pid)
                follow.stop()

        return _Stream(chunks(), media_type="text/event-stream",
                       headers={"X-Accel-Buffering": "no"})

    async def api_action(self, request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise _BadRequest("error: request too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _BadRequest("error: the request is not JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("error: the request is not a JSON object")
        if body.get("grove") not in self.groves:
            raise _BadRequest("error: grove: not served here")
        try:
            argv, stdin = actions.argv_for(body, self.plans)
            if body["action"] == "apply":
                return JSONResponse({"ok": True, "job": self.jobs.start(argv)})
        except actions.Refused as e:
            raise _BadRequest(str(e)) from None
        res = await asyncio.to_thread(actions.run_cli, self.root, argv, stdin)
        self.poke_all()
        if res.code:
            return JSONResponse({"ok": False, "error": res.line(), "output": res.err}, 409)
        return JSONResponse({"ok": True, "message": res.line(), "output": res.out})

    async def api_job(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            raise _NotFound("error: no such job")
        return JSONResponse(job.to_json())

_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@^~-]{0,200}")


class _HTTPError(Exception):
    status = 400


class _BadRequest(_HTTPError):
    status = 400


class _NotFound(_HTTPError):
    status = 404


class _Follow:
    """A child process whose output a thread reads and hands to the event loop, a few
    chunks ahead at most (a slow page slows the child down, nothing piles up). Ended
    with `stop`, synchronously: no asyncio transport outlives the stream."""

    AHEAD = 4  # chunks read before the page took them

    def __init__(self, root: Path, argv: list[str], loop: asyncio.AbstractEventLoop
                 ) -> None:
        self.proc = subprocess.Popen(actions.command(argv), cwd=root, env=actions.env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.loop = loop
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.room = threading.Semaphore(self.AHEAD)
        self.stopped = False
        threading.Thread(target=self._read, daemon=True, name="engine-logs").start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        try:
            while True:
                self.room.acquire()
                if self.stopped:
                    return
                try:
                    data = os.read(out.fileno(), LOG_CHUNK)
                except OSError:
                    data = b""
                try:
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, data)
                except RuntimeError:  # the loop is gone
                    return
                if not data:
                    return
        finally:
            out.close()  # here, never under a read in progress

    async def get(self) -> bytes:
        data = await self.queue.get()
        self.room.release()
        return data

    def wait(self) -> int:
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return -1

    def stop(self) -> None:
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.room.release()  # a reader waiting for room sees it stopped


class _Stream(StreamingResponse):
    """A stream whose generator is always closed with it (its `finally` runs), also when
    the request is cancelled while a slow page holds up a send: the generator's clean-up
    (ending an `engine logs` child) happens then, in the running loop, not whenever
    the generator is collected."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


async def _refused(request: Request, exc: Exception) -> Response:
    """A refused API request or an engine error: its one line as JSON."""
    if isinstance(exc, _HTTPError):
        return JSONResponse({"ok": False, "error": str(exc)}, exc.status)
    assert isinstance(exc, EngineError)
    return JSONResponse({"ok": False, "error": f"error: {exc.summary}"}, 409)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"error": "the command printed no JSON"}
