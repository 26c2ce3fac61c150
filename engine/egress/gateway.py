"""The egress gateway: the host daemon through which agents with `network: egress` reach
the network, one process per repository root (started by `engine.egress.ensure_running`).

Each agent has its own Unix socket (`socket_dir/gw.sock`, mounted into its container);
the socket a connection arrives on is its identity. On it the gateway speaks HTTP/1.1
proxy: `CONNECT host:port` opens a tunnel to an endpoint in that agent's allow list;
plain HTTP in absolute form is forwarded only to a listed loopback endpoint. Everything
else is refused with a status and a one-line reason. Only the request-line target is
ever followed; whatever a client sends after the head goes, verbatim, to that one
endpoint (so request smuggling cannot reach another). With `--listen HOST:PORT` a TCP
listener serves remote agents, identified by `Proxy-Authorization: Basic` (agent id
`<grove>/<agent>` and the policy's token, or a token whose SHA-256 is the policy's
`tokenSha256`); until then a connection is unauthenticated: at most 256 per peer address
and 1024 in all, the oldest closed first past that, and its records name no agent (a
claimed id is `claimed`). `--policies DIR` also serves the policies
`DIR/<grove>.<agent>.json` (a mounted ConfigMap in a Kubernetes namespace: see
docs/kubernetes.md).

Heads, policy and upstream connects run on the event loop; once a tunnel is open, each
direction runs on a pooled thread with blocking `os.splice` through a kernel pipe (the
bytes never enter Python; recv_into/send where splice is missing): measured, this moves
bulk data at the rate of a direct connection where event-loop splicing did not (see
bench/bench_egress.py). Every connection ends with one record in `log.jsonl` and one
`Egress` event (written by a background thread in batches: `events.record` fsyncs);
refusals past 20/s (burst 50) per agent or unauthenticated peer are only counted, with one
summary record (`suppressed`: N) per second while that lasts.

The gateway exits on SIGTERM/SIGINT/`stop` (live tunnels get 2 s), when its state
directory is removed, or after 60 s without any policy.

    python -m engine.egress.gateway --root ROOT [--listen HOST:PORT] [--policies DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import re
import resource
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import egress, events, paths
from engine.inventory import now

PIPE_MAX = 1 << 20  # a pipe that fills in one splice grows to this (bulk transfers)
COPY_BUFFER = 64 * 1024  # where splice is missing
SOCKET_BUFFER = 4 << 20
LOG_ROTATE = 32 << 20
EVENT_QUEUE = 10000
EVENT_PAUSE = 0.25
PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
DROPPED_HEADERS = frozenset({b"host", b"connection", b"keep-alive", b"te", b"upgrade"})
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) ([!-~]{1,16384}) HTTP/1\.([01])")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_BAD_BYTES = re.compile(rb"[^\t\r\n -~]")
_METHOD_START = re.compile(rb"[A-Z]{1,20}(?: |$)")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
            407: "Proxy Authentication Required", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Limits:
    """Every bound the gateway enforces; the timeouts can be shortened by tests through
    ENGINE_EGRESS_* environment variables."""

    head_bytes: int = 16384
    head_lines: int = 100
    head_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 900.0
    max_conns: int = 256  # per agent, and unauthenticated per TCP peer address
    max_unauthenticated: int = 1024  # TCP connections not (yet) authenticated, in all
    max_tunnels: int = 1024
    idle_exit: float = 60.0
    check_every: float = 2.0
    drain: float = 2.0
    linger: float = 1.0
    refusal_rate: float = 20.0  # refused connections recorded per second and agent/peer
    refusal_burst: int = 50  # (a token bucket); past it one summary record per second
    summary_every: float = 1.0

    @classmethod
    def from_env(cls) -> Limits:
        def num(name: str, default: float) -> float:
            try:
                value = float(os.environ.get(f"ENGINE_EGRESS_{name}", default))
            except ValueError:
                return default
            return value if value > 0 else default

        return cls(head_timeout=num("HEAD_TIMEOUT", cls.head_timeout),
                   connect_timeout=num("CONNECT_TIMEOUT", cls.connect_timeout),
                   idle_timeout=num("IDLE_TIMEOUT", cls.idle_timeout),
                   max_conns=int(num("MAX_CONNS", cls.max_conns)),
                   idle_exit=num("IDLE_EXIT", cls.idle_exit),
                   check_every=num("CHECK_EVERY", cls.check_every))


class Refusal(Exception):
    """Ends a connection with an HTTP error status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Agent:
    grove: str
    name: str
    allow: frozenset[tuple[str, int]]
    token: str | None = None
    live: set[Conn] = field(default_factory=set)
    token_sha256: str | None = None  # hex digest of the token (policies in a ConfigMap)


@dataclass(eq=False)
class Conn:
    """One client connection, and the record written when it ends."""

    started: float = field(default_factory=time.monotonic)
    grove: str = ""
    agent: str = ""
    method: str = ""
    target: str = ""
    path: str = ""
    verdict: str = "refused"
    reason: str = ""
    status: int = 0
    up: int = 0
    down: int = 0
    tunnel: Tunnel | None = None
    endpoint: tuple[str, int] | None = None
    peer: str = ""  # TCP: the client's address
    claimed: str = ""  # TCP, refused: the <grove>/<agent> claimed without a valid token
    evicted: bool = False  # TCP: its unauthenticated slot was given to a newer connection
    suppressed: int = 0  # a summary of refusals not recorded one by one

    def rate_key(self) -> tuple[str, str, str]:
        """Whose refusals these are: the agent, or (unauthenticated) the TCP peer."""
        return (self.grove, self.agent, "") if self.agent else ("", "", self.peer)

    def to_json(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "event": "Egress", "grove": self.grove, "agent": self.agent,
            "target": self.target, "verdict": self.verdict, "status": self.status,
            "bytesUp": self.up + (self.tunnel.moved[0] if self.tunnel else 0),
            "bytesDown": self.down + (self.tunnel.moved[1] if self.tunnel else 0),
            "method": self.method,
            "durationMs": int((time.monotonic() - self.started) * 1000)}
        if self.reason:
            rec["reason"] = self.reason[:300]
        if self.path:
            rec["path"] = self.path
        if self.peer:
            rec["peer"] = self.peer
        if self.claimed:  # never the agent: the token did not match
            rec["claimed"] = self.claimed
        if self.suppressed:
            rec["suppressed"] = self.suppressed
        return rec


@dataclass
class Bucket:
    """Refused connections of one agent (or unauthenticated TCP peer) that may still be
    recorded one by one; those past it are counted and summarized."""

    tokens: float
    at: float
    suppressed: int = 0
    since: float = 0.0
    timer: asyncio.TimerHandle | None = None


@dataclass
class Request:
    method: str
    host: str
    port: int
    version: str
    path: str = ""  # origin-form, plain HTTP only
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names as sent


# --- the request head ------------------------------------------------------------------


async def read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    limits: Limits) -> tuple[bytes, bytes]:
    """(head without its final CRLFCRLF, bytes after it). Refusal for anything that is
    not the start of an HTTP request, as soon as that is clear."""
    buf = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, limits.head_bytes + 1 - len(buf))
        if not chunk:
            raise Refusal(400, "connection closed before the request head ended")
        start = max(0, len(buf) - 3)
        buf += chunk
        end = buf.find(b"\r\n\r\n", start)
        stop = len(buf) if end == -1 else end + 4  # what follows the head is not checked
        if _BAD_BYTES.search(buf, start, stop) or not _METHOD_START.match(buf[:21]):
            raise Refusal(400, "not an HTTP request")
        if buf.find(b"\n\n", start, stop) != -1:
            raise Refusal(400, "header lines must end in CRLF")
        if end != -1 and end + 4 <= limits.head_bytes:
            return bytes(buf[:end]), bytes(buf[end + 4:])
        if len(buf) >= limits.head_bytes:
            raise Refusal(431, f"request head larger than {limits.head_bytes} bytes")


def parse_request(head: bytes, limits: Limits) -> Request:
    """The request line and header fields, strictly; Refusal (400/405/431) otherwise."""
    lines = head.split(b"\r\n")
    if len(lines) - 1 > limits.head_lines:
        raise Refusal(431, f"more than {limits.head_lines} header lines")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise Refusal(400, "stray CR or LF in the request head")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if not m:
        raise Refusal(400, "malformed request line")
    method, target, version = m[1].decode(), m[2].decode(), f"HTTP/1.{m[3].decode()}"
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        h = _HEADER.fullmatch(line)
        if not h:
            raise Refusal(400, "malformed header line")
        headers.append((h[1], h[2]))
    names = [n.lower() for n, _ in headers]
    if names.count(b"host") > 1 or names.count(b"content-length") > 1 or (
            b"content-length" in names and b"transfer-encoding" in names):
        raise Refusal(400, "ambiguous Host, Content-Length or Transfer-Encoding")
    if method == "CONNECT":
        try:
            host, port = egress.parse_endpoint(target)
        except ValueError:
            raise Refusal(400, "CONNECT target is not host:port") from None
        return Request(method, host, port, version, headers=headers)
    if method not in PLAIN_METHODS:
        raise Refusal(405, f"method {method} is not supported")
    host, port, path = _absolute_http(target)
    return Request(method, host, port, version, path, headers)


def _absolute_http(target: str) -> tuple[str, int, str]:
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        if scheme.lower() == "https":
            raise Refusal(400, "https:// URLs go through CONNECT")
        raise Refusal(400, "not a proxy request: an absolute http:// URL is expected")
    if "#" in rest:
        raise Refusal(400, "fragment in the request target")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise Refusal(400, "userinfo in the request target")
    if authority.endswith("]") or ":" not in authority:  # no port: 80
        authority += ":80"
    try:
        host, port = egress.parse_endpoint(authority)
    except ValueError:
        raise Refusal(400, "bad host or port in the request target") from None
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def rewrite(req: Request) -> bytes:
    """The head sent upstream for plain HTTP: origin-form, Host from the request-line
    target only, hop-by-hop and Proxy-* fields dropped, `Connection: close`."""
    authority = egress.format_endpoint(req.host, req.port)
    if req.port == 80:
        authority = authority.rsplit(":", 1)[0]
    out = [f"{req.method} {req.path} {req.version}\r\nHost: {authority}\r\n".encode()]
    for name, value in req.headers:
        if name.lower() in DROPPED_HEADERS or name.lower().startswith(b"proxy-"):
            continue
        out.append(name + b": " + value + b"\r\n")
    out.append(b"Connection: close\r\n\r\n")
    return b"".join(out)


def response(status: int, body: str, extra: str = "") -> bytes:
    data = (body + "\n").encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + data


# --- tunnels -----------------------------------------------------------------------------


class Pipes:
    """Idle kernel pipes kept for the next tunnels: [read fd, write fd, size]. A pipe goes
    back only when the kernel says it is empty, so no byte of one tunnel reaches another."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self.free: list[list[int]] = []

    def get(self) -> list[int] | None:
        with contextlib.suppress(IndexError):
            return self.free.pop()
        if not hasattr(os, "splice"):
            return None
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            return None
        return [r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)]

    def put(self, pipe: list[int]) -> None:
        if len(self.free) < self.keep:
            with contextlib.suppress(OSError):
                if struct.unpack("i", fcntl.ioctl(pipe[0], termios.FIONREAD, b"\0" * 4))[0] == 0:
                    self.free.append(pipe)
                    return
        for fd in pipe[:2]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        while self.free:
            for fd in self.free.pop()[:2]:
                os.close(fd)


class Tunnel:
    """Both directions between a client and its upstream, each on a pool thread moving
    bytes with blocking `os.splice` through a pipe (they never enter Python; recv/send
    where splice is missing). At EOF a direction shuts down the other side's write half;
    the last one to end closes both sockets and resolves `ended` ('' or why it ended
    early). `abort` (reload, idle, stop) shuts both sockets down: both directions end."""

    def __init__(self, gw: Gateway, client: socket.socket, upstream: socket.socket,
                 conn: Conn) -> None:
        self.loop, self.pipes, self.conn = gw.loop, gw.pipes, conn
        self.idle = gw.limits.idle_timeout
        self.socks = (client, upstream)
        self.last = time.monotonic()
        self.ended: asyncio.Future[str] = gw.loop.create_future()
        self.reason = ""
        self.moved = [0, 0]
        self.left = 2
        self.closed = False
        self.lock = threading.Lock()
        for sock in self.socks:
            sock.setblocking(True)
        with contextlib.suppress(OSError):  # a Unix socket's buffer is small: 208 KiB
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.registry = gw.tunnels
        self.registry.add(self)
        self.timer = self.loop.call_later(self.idle, self._check_idle)
        for started, args in enumerate(((client, upstream, 0), (upstream, client, 1))):
            try:
                gw.pool.submit(self._pump, *args)
            except RuntimeError as e:  # no thread to be had: give the tunnel up
                self.abort(f"cannot start a thread: {e}")
                for _ in range(2 - started):
                    self._done()
                return

    def abort(self, reason: str) -> None:
        with self.lock:
            self.reason = self.reason or reason
            if not self.closed:
                for sock in self.socks:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def _check_idle(self) -> None:
        left = self.last + self.idle - time.monotonic()
        if self.ended.done():
            return
        if left > 0:
            self.timer = self.loop.call_later(left, self._check_idle)
        else:
            self.abort(f"idle for {self.idle:g} s")

    def _pump(self, src: socket.socket, dst: socket.socket, i: int) -> None:
        """One direction, on a pool thread (i: 0 up, 1 down)."""
        try:
            if i == 1 and self.conn.method != "CONNECT":  # plain HTTP: the status line
                m = _STATUS.match(src.recv(16, socket.MSG_PEEK))
                self.conn.status = int(m[1]) if m else 0
            self._move(src, dst, i)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except Exception as e:  # OSError, or a bug: this tunnel ends, the gateway goes on
            self.abort(_describe(e))
        finally:
            self._done()

    def _done(self) -> None:
        """A direction has ended; the last one closes the sockets and ends the tunnel."""
        with self.lock:
            self.left -= 1
            last = self.left == 0
            if last:
                self.closed = True
                for sock in self.socks:
                    sock.close()
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is gone: exiting
                self.loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:
        self.timer.cancel()
        self.registry.discard(self)
        if not self.ended.done():
            self.ended.set_result(self.reason)

    def _move(self, src: socket.socket, dst: socket.socket, i: int) -> None:
        pipe = self.pipes.get()
        if pipe is None:
            buf = bytearray(COPY_BUFFER)
            view = memoryview(buf)
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
                self.moved[i] += n
                self.last = time.monotonic()
            return
        r, w, size = pipe
        pending = 0
        try:
            while n := os.splice(src.fileno(), w, size, flags=os.SPLICE_F_MOVE):
                pending = n
                while pending:
                    m = os.splice(r, dst.fileno(), pending, flags=os.SPLICE_F_MOVE)
                    pending -= m
                    self.moved[i] += m
                self.last = time.monotonic()
                if n == size < PIPE_MAX:  # filled at once: a bulk transfer
                    with contextlib.suppress(OSError):
                        pipe[2] = size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_MAX)
        finally:
            if pending:  # bytes left in it: never reused
                for fd in (r, w):
                    os.close(fd)
            else:
                self.pipes.put(pipe)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return f"{type(error).__name__}: {error}"[:200]


# --- the gateway -------------------------------------------------------------------------


@dataclass
class Listener:
    path: Path
    sock: socket.socket
    ino: int


class Gateway:
    """One repository's gateway: its control socket, one listener per agent policy, the
    optional TCP listener, and the records of every connection."""

    def __init__(self, root: Path, limits: Limits, listen: tuple[str, int] | None) -> None:
        self.root, self.limits, self.listen = root, limits, listen
        self.state = egress.state_dir(root)
        self.state_ino = os.stat(self.state).st_ino
        self.agents: dict[tuple[str, str], Agent] = {}
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.control: Listener | None = None
        self.tcp: socket.socket | None = None
        self.tcp_live = 0  # unauthenticated TCP connections: sum of len(heads[peer])
        self.heads: dict[str, dict[Conn, socket.socket]] = {}  # by peer, oldest first
        self.buckets: dict[tuple[str, str, str], Bucket] = {}
        self.pruned = 0.0
        self.pipes = Pipes()
        self.tunnels: set[Tunnel] = set()
        self.pool = ThreadPoolExecutor(2 * limits.max_tunnels, "egress-pump")
        self.reload_lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.signature: tuple[tuple[str, int, int], ...] = ()
        self.no_policy_since: float | None = None
        self.loop = asyncio.get_running_loop()
        self.log_path = self.state / egress.LOG_NAME
        self.log_fd = self._open_log()
        self.log_size = os.fstat(self.log_fd).st_size
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue(EVENT_QUEUE)
        # ENGINE_EGRESS_EVENTS=0 (in a cluster): log.jsonl, which rotates, is the record;
        # the repository's events.jsonl does not exist there and would only grow
        self.record_events = os.environ.get("ENGINE_EGRESS_EVENTS", "1") != "0"
        self.events_dropped = 0
        self.closing = threading.Event()  # set when stopping: no more pauses
        self.writer = threading.Thread(target=self._event_writer, name="egress-events",
                                       daemon=True)
        self.lines: list[float] = []

    # lifecycle

    async def run(self) -> None:
        self.loop.set_exception_handler(
            lambda _loop, ctx: self.say(f"internal error: {ctx.get('message', '')} "
                                        f"{ctx.get('exception', '')!r}"))
        self.writer.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self._bind_control()
        (self.state / "gateway.pid").write_text(f"{os.getpid()}\n")
        problems = await self.reload()
        for p in problems:
            self.say(p)
        if self.listen is not None:
            self._bind_tcp(*self.listen)
        self.say(f"started (pid {os.getpid()}), {len(self.agents)} agent(s)")
        checker = asyncio.create_task(self._check())
        await self.stopping.wait()
        checker.cancel()
        await self._shutdown()

    async def _shutdown(self) -> None:
        for key in list(self.listeners):
            self._close_listener(self.listeners.pop(key))
        if self.control is not None:
            self._close_listener(self.control)
        if self.tcp is not None:
            self.loop.remove_reader(self.tcp.fileno())
            self.tcp.close()
        if self.tunnels:
            await asyncio.wait([t.ended for t in self.tunnels], timeout=self.limits.drain)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        if self.tunnels:  # aborted: their threads end at once
            await asyncio.wait([t.ended for t in self.tunnels], timeout=5)
        for whose in list(self.buckets):
            self._summarize(whose)
        self.pool.shutdown(wait=False)
        self.events.put(None)
        self.closing.set()
        await asyncio.to_thread(self.writer.join, 5)
        self.pipes.close()
        pid = self.state / "gateway.pid"
        with contextlib.suppress(OSError):
            if pid.read_text().strip() == str(os.getpid()):
                pid.unlink()
        os.close(self.log_fd)
        self.say("stopped")

    async def _check(self) -> None:
        """Every few seconds: exit if the state dir is gone or no policy is left for
        `idle_exit`; reload when the policy files changed; rebind a removed socket."""
        while True:
            await asyncio.sleep(self.limits.check_every)
            try:
                if os.stat(self.state).st_ino != self.state_ino:
                    raise FileNotFoundError
            except FileNotFoundError:
                self.say("state directory removed: exiting")
                self.stopping.set()
                return
            try:
                if self._signature() != self.signature or self._sockets_moved():
                    for p in await self.reload():
                        self.say(p)
                if self.control is not None and _ino(self.control.path) != self.control.ino:
                    self._close_listener(self.control)
                    self._bind_control()
            except Exception as e:  # keep serving; say what went wrong once per pass
                self.say(f"check failed: {_describe(e)}")
            if self.agents:
                self.no_policy_since = None
            elif self.no_policy_since is None:
                self.no_policy_since = time.monotonic()
            elif time.monotonic() - self.no_policy_since >= self.limits.idle_exit:
                self.say(f"no policy for {int(self.limits.idle_exit)} s: exiting")
                self.stopping.set()
                return

    # policies and listeners

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in sorted((self.state / "agents").glob("*/*.json")):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _sockets_moved(self) -> bool:
        return any(_ino(li.path) != li.ino for li in self.listeners.values())

    async def reload(self) -> list[str]:
        """Re-read every policy: listen for new agents, stop listening for removed ones
        (ending their tunnels), end tunnels to endpoints no longer allowed. Returns the
        problems (one line each); a broken policy is not served."""
        async with self.reload_lock:
            self.signature = self._signature()
            found: dict[tuple[str, str], Agent] = {}
            problems: list[str] = []
            for path, _, _ in self.signature:
                try:
                    a = load_policy(Path(path))
                except (OSError, ValueError) as e:
                    problems.append(f"policy {Path(path).parent.name}/{Path(path).name}: "
                                    f"{_describe(e) if isinstance(e, OSError) else e}")
                    continue
                found[(a.grove, a.name)] = a
            for key in [k for k in self.agents if k not in found]:
                if key in self.listeners:
                    self._close_listener(self.listeners.pop(key))
                for c in list(self.agents.pop(key).live):
                    if c.tunnel is not None:
                        c.tunnel.abort("agent's egress policy removed")
            for key, new in found.items():
                old = self.agents.get(key)
                if old is None:
                    self.agents[key] = new
                else:
                    old.allow, old.token = new.allow, new.token
                    old.token_sha256 = new.token_sha256
                    for c in list(old.live):
                        if c.tunnel is not None and c.endpoint not in old.allow:
                            c.tunnel.abort("endpoint removed from the agent's egress list")
                li = self.listeners.get(key)
                if li is not None and _ino(li.path) != li.ino:
                    self._close_listener(self.listeners.pop(key))
                    li = None
                if li is None:
                    try:
                        self.listeners[key] = self._bind_agent(key)
                    except OSError as e:
                        problems.append(f"agent {key[0]}/{key[1]}: cannot listen: "
                                        f"{_describe(e)}")
            self.signature = self._signature()
            return problems

    def _bind_agent(self, key: tuple[str, str]) -> Listener:
        directory = egress.socket_dir(self.root, *key)
        for d in (directory.parent.parent, directory.parent, directory):
            d.mkdir(mode=0o755, exist_ok=True)
        path = directory / egress.SOCKET_NAME
        sock = _unix_listener(path, 0o666)
        self._accept(sock, lambda conn: self._spawn(self._handle(conn, key)))
        return Listener(path, sock, _ino(path))

    def _bind_control(self) -> None:
        path = self.state / "control.sock"
        sock = _unix_listener(path, 0o600)
        self._accept(sock, lambda conn: self._spawn(self._control(conn)))
        self.control = Listener(path, sock, _ino(path))

    def _bind_tcp(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self.tcp = sock
        self._accept(sock, lambda conn: self._spawn(self._handle(conn, None)))
        self.say(f"listening on {egress.format_endpoint(host, sock.getsockname()[1])}")

    def _close_listener(self, li: Listener) -> None:
        self.loop.remove_reader(li.sock.fileno())
        li.sock.close()
        if _ino(li.path) == li.ino:
            with contextlib.suppress(OSError):
                li.path.unlink()

    def _accept(self, lsock: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        """Accept on `lsock` for as long as it is open; each connection goes to `serve`.
        Out of descriptors: pause 100 ms (the backlog waits)."""
        def ready() -> None:
            for _ in range(64):
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                       errno.ENOMEM):
                        self.say(f"accept failed: {_describe(e)}")
                    self.loop.remove_reader(lsock.fileno())
                    self.loop.call_later(0.1, resume)
                    return
                conn.setblocking(False)
                serve(conn)

        def resume() -> None:
            if lsock.fileno() != -1:
                self.loop.add_reader(lsock.fileno(), ready)

        resume()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _control(self, conn: socket.socket) -> None:
        """One control command per connection: ping, reload, stop."""
        with conn:
            try:
                line = b""
                async with asyncio.timeout(5):
                    while b"\n" not in line and len(line) < 64:
                        chunk = await self.loop.sock_recv(conn, 64)
                        if not chunk:
                            break
                        line += chunk
                command = line.split(b"\n")[0].strip().decode(errors="replace")
                if command == "ping":
                    reply = "ok"
                elif command == "reload":
                    problems = await self.reload()
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    reply = f"error {problems[0]}{more}" if problems else "ok"
                elif command == "stop":
                    reply = "ok"
                    self.stopping.set()
                else:
                    reply = "error unknown command"
                await self.loop.sock_sendall(conn, reply.encode() + b"\n")
            except (OSError, TimeoutError):
                pass

    # connections

    async def _handle(self, client: socket.socket, key: tuple[str, str] | None) -> None:
        """One agent connection from accept to its record."""
        c = Conn()
        agent: Agent | None = None
        upstream: socket.socket | None = None
        try:
            try:
                if key is not None:
                    c.grove, c.agent = key
                    agent = self.agents.get(key)
                    if agent is None:
                        raise Refusal(403, "no egress policy for this agent")
                    if len(agent.live) >= self.limits.max_conns:
                        raise Refusal(503, f"more than {self.limits.max_conns} connections")
                    agent.live.add(c)
                else:
                    self._admit(client, c)
                try:
                    async with asyncio.timeout(self.limits.head_timeout):
                        head, rest = await read_head(self.loop, client, self.limits)
                except TimeoutError:
                    raise Refusal(408, f"request head not received within "
                                       f"{self.limits.head_timeout:g} s") from None
                except Refusal:
                    if not c.evicted:
                        raise
                if c.evicted:  # its read side was shut down: whatever it read is moot
                    raise Refusal(503, f"more unauthenticated connections from {c.peer} "
                                       f"or in all than allowed: the oldest are closed")
                req = parse_request(head, self.limits)
                c.method = req.method
                c.target = egress.format_endpoint(req.host, req.port)
                c.endpoint = (req.host, req.port)
                if req.path:
                    c.path = req.path.split("?", 1)[0][:200]
                if agent is None:
                    agent = self._authenticate(req, c)
                    self._release(c)  # authenticated: counted as its agent's from now on
                    agent.live.add(c)
                upstream = await self._open(agent, req, c)
                c.verdict = "allowed"
            except Refusal as r:
                c.status, c.reason = r.status, r.reason
                extra = ""
                if r.status == 407:
                    extra = 'Proxy-Authenticate: Basic realm="engine-egress"\r\n'
                await self._refuse(client, c, extra)
                return
            await self._relay(client, upstream, req, rest, c)
        except asyncio.CancelledError:
            c.reason = c.reason or "gateway stopped"
            raise
        except Exception as e:  # a bug: this connection ends, the gateway goes on
            c.reason = f"internal error: {_describe(e)}"
            self.say(c.reason)
        finally:
            if c.tunnel is not None:  # its threads own the sockets now: they close them
                c.tunnel.abort(c.reason)
            else:
                for s in (client, upstream):
                    if s is not None:
                        s.close()
            if agent is not None:
                agent.live.discard(c)
            if c.peer:
                self._release(c)
            self._record(c)

    def _admit(self, client: socket.socket, c: Conn) -> None:
        """Count a new TCP connection as unauthenticated (until `_authenticate` succeeds).
        At most `max_conns` per peer address and `max_unauthenticated` in all: past either,
        the oldest one of that peer (or of the peer that has the most) is closed with a
        503, so that one client cannot lock the others out by connecting and saying
        nothing; a real client sends its head at once."""
        try:
            c.peer = str(client.getpeername()[0])
        except (OSError, IndexError):
            c.peer = "?"
        mine = self.heads.get(c.peer)
        if mine is not None and len(mine) >= self.limits.max_conns:
            self._evict(c.peer)
        elif self.tcp_live >= self.limits.max_unauthenticated and self.heads:
            self._evict(max(self.heads, key=lambda peer: len(self.heads[peer])))
        self.heads.setdefault(c.peer, {})[c] = client
        self.tcp_live += 1

    def _evict(self, peer: str) -> None:
        mine = self.heads[peer]
        oldest = next(iter(mine))
        sock = mine.pop(oldest)
        if not mine:
            del self.heads[peer]
        self.tcp_live -= 1
        oldest.evicted = True
        with contextlib.suppress(OSError):  # its read_head (or _refuse) sees the end
            sock.shutdown(socket.SHUT_RD)

    def _release(self, c: Conn) -> None:
        mine = self.heads.get(c.peer)
        if mine is not None and mine.pop(c, None) is not None:
            self.tcp_live -= 1
            if not mine:
                del self.heads[c.peer]

    def _authenticate(self, req: Request, c: Conn) -> Agent:
        """The agent a TCP connection speaks for: Proxy-Authorization: Basic
        base64(<grove>/<agent>:<token>) matching that agent's policy token."""
        values = [v for n, v in req.headers if n.lower() == b"proxy-authorization"]
        if len(values) != 1:
            raise Refusal(407, "proxy authentication required")
        scheme, _, credentials = values[0].partition(b" ")
        try:
            if scheme.lower() != b"basic":
                raise ValueError
            ident, _, token = base64.b64decode(credentials.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (ValueError, binascii.Error):
            raise Refusal(407, "malformed proxy credentials") from None
        grove, _, name = ident.partition("/")
        try:
            egress.check_name("grove", grove)
            egress.check_name("agent", name)
        except ValueError:
            raise Refusal(407, "unknown agent") from None
        c.claimed = f"{grove}/{name}"  # not its identity (records) until the token matches
        agent = self.agents.get((grove, name))
        if agent is not None and agent.token_sha256:
            given = hashlib.sha256(token.encode()).hexdigest()
            known = hmac.compare_digest(agent.token_sha256, given)
        else:
            expected = (agent.token if agent is not None else None) or ""
            known = hmac.compare_digest(expected.encode(), token.encode()) and bool(expected)
        if not known:
            raise Refusal(407, "wrong agent token")
        assert agent is not None
        c.grove, c.agent, c.claimed = grove, name, ""
        if len(agent.live) >= self.limits.max_conns:
            raise Refusal(503, f"more than {self.limits.max_conns} connections")
        return agent

    async def _open(self, agent: Agent, req: Request, c: Conn) -> socket.socket:
        """The policy decision, then the upstream connection (10 s for both resolving
        and connecting)."""
        if (req.host, req.port) not in agent.allow:
            raise Refusal(403, f"{c.target} is not in the egress list of agent "
                               f"{agent.grove}/{agent.name}")
        loopback = egress.is_loopback(req.host)
        if req.method != "CONNECT" and not loopback:
            raise Refusal(403, f"plain HTTP to {c.target} refused: use HTTPS (CONNECT)")
        if len(self.tunnels) >= self.limits.max_tunnels:
            raise Refusal(503, f"more than {self.limits.max_tunnels} tunnels in all")
        c.verdict = "allowed"  # by the policy; the status says whether upstream answered
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                return await self._connect(req.host, req.port, loopback)
        except TimeoutError:
            raise Refusal(504, f"connecting to {c.target} timed out") from None

    async def _connect(self, host: str, port: int, loopback: bool) -> socket.socket:
        literal = _is_ip(host)
        infos: list[tuple[Any, ...]]
        if literal:  # no resolver (and no thread) for an address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            infos = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
        else:
            try:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_NUMERICSERV)
            except OSError as e:
                raise Refusal(502, f"cannot resolve {host}: {_describe(e)}") from None
        if not literal and not loopback:  # a listed name must not lead to this host
            infos = [i for i in infos if not _local_address(str(i[4][0]))]
            if not infos:
                raise Refusal(403, f"{host} resolves to a loopback address (or another "
                                   "local or link-local one)")
        error: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise Refusal(502, f"cannot connect to {egress.format_endpoint(host, port)}: "
                           f"{_describe(error) if error else 'no address'}")

    async def _relay(self, client: socket.socket, upstream: socket.socket, req: Request,
                     rest: bytes, c: Conn) -> None:
        """Send what the client already sent (after the 200, or the rewritten head), then
        splice both ways until the end."""
        if req.method == "CONNECT":
            await self.loop.sock_sendall(client, b"HTTP/1.1 200 Connection established\r\n\r\n")
            c.status = 200
            data = rest
        else:
            data = rewrite(req) + rest
        if data:
            await self.loop.sock_sendall(upstream, data)
            c.up += len(data)
        c.tunnel = Tunnel(self, client, upstream, c)
        reason = await asyncio.shield(c.tunnel.ended)
        if reason:
            c.reason = reason
        elif req.method != "CONNECT" and not c.tunnel.moved[1]:
            c.status, c.reason = 502, "upstream closed without a response"

    async def _refuse(self, client: socket.socket, c: Conn, extra: str) -> None:
        """Send the error response, then read (and drop) what the client still sends for
        a moment so that closing does not reset the connection before it reads."""
        prefix = "egress refused" if c.status in (403, 407) else "egress"
        with contextlib.suppress(OSError):
            await self.loop.sock_sendall(client, response(c.status, f"{prefix}: {c.reason}",
                                                          extra))
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.limits.linger):
                for _ in range(16):
                    if not await self.loop.sock_recv(client, 4096):
                        break

    # records

    def _open_log(self) -> int:
        return os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o600)

    def _record(self, c: Conn) -> None:
        """The connection's record; a refused one only while its agent (or TCP peer) is
        within `refusal_rate`/`refusal_burst`: past that they are counted, and one summary
        per `summary_every` s says how many (a refusal flood must not fill the logs)."""
        if c.verdict == "refused" and not self._may_record(c):
            return
        self._write({"time": now(), **c.to_json()})

    def _may_record(self, c: Conn) -> bool:
        t = time.monotonic()
        key = c.rate_key()
        rate, burst = self.limits.refusal_rate, self.limits.refusal_burst
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= 4096 and t - self.pruned >= 1:
                self.pruned = t  # forget buckets that are full again
                self.buckets = {k: v for k, v in self.buckets.items()
                                if v.timer is not None or v.tokens + (t - v.at) * rate < burst}
            b = self.buckets[key] = Bucket(float(burst), t)
        b.tokens, b.at = min(float(burst), b.tokens + (t - b.at) * rate), t
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        if not b.suppressed:
            b.since = t
        b.suppressed += 1
        if b.timer is None:
            b.timer = self.loop.call_later(self.limits.summary_every, self._summarize, key)
        return False

    def _summarize(self, key: tuple[str, str, str]) -> None:
        b = self.buckets.get(key)
        if b is None:
            return
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
        if b.suppressed:
            grove, agent, peer = key
            s = Conn(started=b.since, grove=grove, agent=agent, peer=peer,
                     reason=f"{b.suppressed} refusals suppressed", suppressed=b.suppressed)
            b.suppressed = 0
            self._write({"time": now(), **s.to_json()})

    def _write(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        try:
            if self.log_size + len(line) > LOG_ROTATE:
                os.replace(self.log_path, self.log_path.with_name(egress.LOG_NAME + ".1"))
                os.close(self.log_fd)
                self.log_fd = self._open_log()
                self.log_size = 0
            os.write(self.log_fd, line)
            self.log_size += len(line)
        except OSError as e:
            self.say(f"cannot write the connection log: {_describe(e)}")
        if not self.record_events:
            return
        try:
            self.events.put_nowait(rec)
        except queue.Full:
            self.events_dropped += 1

    def _event_writer(self) -> None:
        """Background thread: the records as `Egress` events, in batches at most every
        EVENT_PAUSE s (`events.record` locks and fsyncs: kept off the event loop)."""
        while True:
            batch = [self.events.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < EVENT_QUEUE:
                    batch.append(self.events.get_nowait())
            if self.events_dropped:
                dropped, self.events_dropped = self.events_dropped, 0
                self.say(f"{dropped} egress event(s) not recorded (queue full); "
                         f"log.jsonl has them")
            for rec in batch:
                if rec is None:
                    return
                if not (paths.state(self.root)).is_dir():
                    continue  # the repository is gone: do not recreate it
                try:
                    events.record(self.root, rec)
                except OSError as e:
                    self.say(f"cannot write the event log: {_describe(e)}")
            self.closing.wait(EVENT_PAUSE)

    def say(self, message: str) -> None:
        """One line to stderr (gateway.log), at most 50 every 10 s."""
        t = time.monotonic()
        self.lines = [x for x in self.lines if t - x < 10][-50:]
        if len(self.lines) >= 50:
            return
        self.lines.append(t)
        clean = "".join(ch if ch.isprintable() else "?" for ch in message)[:500]
        with contextlib.suppress(OSError, ValueError):
            print(f"{now()} egress gateway: {clean}", file=sys.stderr, flush=True)


def load_policy(path: Path) -> Agent:
    """An agent's policy file, strictly: names matching its path, valid endpoints. The
    path is `agents/<grove>/<agent>.json`, or `agents/<dir>/<grove>.<agent>.json` (a key
    of the ConfigMap `--policies` serves; names never hold a dot)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read((1 << 20) + 1)
    if len(data) > 1 << 20:
        raise ValueError("larger than 1 MiB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    grove, dot, name = path.name.removesuffix(".json").partition(".")
    if not dot:
        grove, name = path.parent.name, grove
    if doc.get("grove") != grove or doc.get("agent") != name:
        raise ValueError("grove/agent do not match the file's path")
    egress.check_name("grove", grove)
    egress.check_name("agent", name)
    allow = doc.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(e, str) for e in allow):
        raise ValueError("allow must be a list of host:port strings")
    token = doc.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string")
    digest = doc.get("tokenSha256")
    if digest is not None and (not isinstance(digest, str)
                               or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError("tokenSha256 must be 64 lowercase hex digits")
    if token is not None and digest is not None:
        raise ValueError("token and tokenSha256 exclude each other")
    return Agent(grove, name, frozenset(egress.parse_endpoint(e) for e in allow), token,
                 token_sha256=digest)


def _unix_listener(path: Path, mode: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with egress.short_path(path) as addr:
            sock.bind(addr)
        os.chmod(path, mode)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _ino(path: Path) -> int:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return -1


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _local_address(addr: str) -> bool:
    """Whether a resolved address is this host's, or one a name must never lead to:
    loopback, unspecified, link-local (the cloud metadata service) or multicast, also as
    an IPv4-mapped IPv6 address. A listed literal address is the list's own choice."""
    bare = addr.split("%")[0]
    if egress.is_loopback(bare):
        return True
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.egress.gateway")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--listen", help="HOST:PORT for remote agents (Proxy-Authorization)")
    ap.add_argument("--policies", type=Path, metavar="DIR",
                    help="also serve the policies DIR/<grove>.<agent>.json (e.g. a mounted "
                         "ConfigMap); ROOT's state directory is created")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    state = egress.state_dir(root)
    listen = None
    if args.listen:
        try:
            listen = egress.parse_endpoint(args.listen)
        except ValueError as e:
            print(f"egress gateway: --listen: {e}", file=sys.stderr)
            return 2
    if args.policies is not None:
        # state/agents/configmap -> DIR; in a ConfigMap volume DIR/..data, where the files
        # are not symlinks (O_NOFOLLOW) and which the kubelet swaps on each update
        src = args.policies.resolve()
        if (src / "..data").is_dir():
            src = src / "..data"
        link = state / "agents" / "configmap"
        try:
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            link.parent.mkdir(mode=0o700, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(src, target_is_directory=True)
        except OSError as e:
            print(f"egress gateway: --policies: {_describe(e)}", file=sys.stderr)
            return 1
    if not state.is_dir():
        print(f"egress gateway: no state directory {state}", file=sys.stderr)
        return 1
    threading.stack_size(512 * 1024)  # pump threads: thousands, shallow
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    del soft
    lock = os.open(state / "gateway.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("egress gateway: another gateway serves this repository", file=sys.stderr)
        return 1

    async def serve() -> None:
        await Gateway(root, Limits.from_env(), listen).run()

    try:
        asyncio.run(serve())
    except OSError as e:
        print(f"egress gateway: {_describe(e)}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
