"""The egress gateway and forwarder, for real: a gateway process started the way the engine
starts it (`ensure_running`), real upstreams on loopback (a TCP echo server for tunnels,
`http.server` for plain HTTP), real Unix and TCP sockets, and the forwarder as its own
process, inside a fresh network namespace (`unshare --net`) where the namespace allows.

Everything a client sends is hostile: the cases below are the attacks the gateway must
refuse with a status and a record, without hanging and without a traceback."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import egress, events
from engine.errors import EngineError

FORWARDER = Path(egress.__file__).parent / "forwarder.py"


# --- upstreams ---------------------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)  # the client half-closed: so do we


class _Threading(socketserver.ThreadingTCPServer):
    request_queue_size = 512
    daemon_threads = True
    allow_reuse_address = True


class _Web(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, dict[str, str]]]

    def do_GET(self) -> None:
        self.seen.append((self.command, self.path, dict(self.headers.items())))
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on loopback; its port."""
    srv = _Threading(("127.0.0.1", 0), _EchoHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def web() -> Iterator[tuple[int, list[tuple[str, str, dict[str, str]]]]]:
    """An HTTP server on loopback: (port, the requests it saw)."""
    seen: list[tuple[str, str, dict[str, str]]] = []
    handler = type("H", (_HttpHandler,), {"seen": seen})
    srv = _Web(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], seen
    srv.shutdown()
    srv.server_close()


# --- the gateway -------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A repository root whose gateway (once started) has short timeouts and is stopped
    after the test."""
    monkeypatch.setenv("ENGINE_EGRESS_HEAD_TIMEOUT", "1")
    monkeypatch.setenv("ENGINE_EGRESS_CHECK_EVERY", "0.2")
    r = tmp_path / "repo"
    r.mkdir()
    yield r
    egress.stop(r)


def sock_path(root: Path, agent: str = "a", grove: str = "g") -> Path:
    return egress.socket_dir(root, grove, agent) / egress.SOCKET_NAME


def connect(path: Path) -> socket.socket:
    """A connection to a gateway socket. A full listen backlog (EAGAIN on a Unix socket
    with a timeout) is waited out for up to 10 s, as a blocking client would."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            with egress.short_path(path) as addr:
                s.connect(addr)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except BaseException:
            s.close()
            raise


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def ask(path: Path, data: bytes) -> bytes:
    """Send `data`, return everything the gateway answers until it closes."""
    with connect(path) as s:
        s.sendall(data)
        return read_all(s)


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def records(root: Path, n: int, **match: Any) -> list[dict[str, Any]]:
    """The first n log records matching `match`, waiting a little for them."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in egress.read_log(root)
                 if all(r.get(k) == v for k, v in match.items())]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def gateway_pid(root: Path) -> int:
    return int((egress.state_dir(root) / "gateway.pid").read_text())


def gone(pid: int, timeout: float) -> bool:
    """The process has exited (a zombie counts: it is our child until reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def start(root: Path, allow: dict[str, list[str]], **tokens: str) -> None:
    for agent, endpoints in allow.items():
        egress.write_policy(root, "g", agent, endpoints, tokens.get(agent))
    egress.ensure_running(root)


# --- the endpoint grammar ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("api.Example.COM:443", ("api.example.com", 443)),
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("[::1]:80", ("::1", 80)),
    ("[2001:DB8:0:0::1]:443", ("2001:db8::1", 443)),
    ("localhost:65535", ("localhost", 65535)),
    ("a-b.c1:1", ("a-b.c1", 1)),
])
def test_parse_endpoint_normalizes(text: str, expected: tuple[str, int]) -> None:
    assert egress.parse_endpoint(text) == expected


@pytest.mark.parametrize("text", [
    "example.com", "example.com:", ":443", "example.com:0", "example.com:65536",
    "example.com:+443", "example.com:-1", "example.com:0443", "example.com:4_43",
    "example.com:\uff14\uff14\uff13",  # fullwidth digits
    "https://example.com:443", "example.com:443/path",
    "user@example.com:443", "user:pw@example.com:443", "*.example.com:443",
    "exa%6dple.com:443", "-example.com:443", "example-.com:443", "ex_ample.com:443",
    "example..com:443", "example.com.:443", "::1:443", "[::1]", "[fe80::1%eth0]:443",
    "[fe80::1%25eth0]:443", "[127.0.0.1]:80", "127.1:80", "0x7f.0.0.1:80",
    "0177.0.0.1:80", "2130706433:80", "256.0.0.1:80", "1.2.3.4.5:80", "example.123:80",
    "ex ample.com:443", "example.com:443\n", "exämple.com:443", f"{'a' * 64}.com:443",
    ".".join(["abcdefghi"] * 26) + ".com:443", "", "[]:80", "[::1]x:80",
])
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError) as e:
        egress.parse_endpoint(text)
    assert "\n" not in str(e.value)


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "LOCALHOST",
                 "::ffff:127.0.0.1"):
        assert egress.is_loopback(host), host
    for host in ("10.0.0.1", "example.com", "::", "0.0.0.0", "128.0.0.1", "localhost.com"):
        assert not egress.is_loopback(host), host


def test_write_policy_normalizes_and_refuses(tmp_path: Path) -> None:
    path = egress.write_policy(tmp_path, "g", "a", ["B.example.com:443", "[::1]:80",
                                                    "b.example.com:443"])
    doc = json.loads(path.read_text())
    assert doc == {"grove": "g", "agent": "a", "allow": ["[::1]:80", "b.example.com:443"]}
    assert oct(egress.socket_dir(tmp_path, "g", "a").stat().st_mode & 0o777) == "0o755"
    assert oct(egress.state_dir(tmp_path).stat().st_mode & 0o777) == "0o700"
    with pytest.raises(EngineError, match="egress: invalid endpoint"):
        egress.write_policy(tmp_path, "g", "a", ["http://x.com:443"])
    for bad in ("../x", "a/b", ".hidden", "", "a" * 70):
        with pytest.raises(ValueError):
            egress.write_policy(tmp_path, bad, "a", [])
        with pytest.raises(ValueError):
            egress.write_policy(tmp_path, "g", bad, [])
    egress.remove_policy(tmp_path, "g", "a")
    assert not path.exists() and not egress.socket_dir(tmp_path, "g", "a").exists()


# --- tunnels and plain HTTP --------------------------------------------------------------


def test_connect_moves_bytes_both_ways_and_is_recorded(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    payload = os.urandom(3 << 20)
    with connect(sock_path(root)) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, rest = read_head(s)
        assert head == b"HTTP/1.1 200 Connection established"
        got = bytearray(rest)
        writer = threading.Thread(target=lambda: (s.sendall(payload),
                                                  s.shutdown(socket.SHUT_WR)))
        writer.start()
        got += read_all(s)  # the echo half-closes after our half-close: EOF reaches us
        writer.join()
    assert bytes(got) == payload
    [rec] = records(root, 1, verdict="allowed")
    assert rec["target"] == f"127.0.0.1:{echo}" and rec["method"] == "CONNECT"
    assert rec["bytesUp"] == rec["bytesDown"] == len(payload)
    assert rec["status"] == 200 and rec["grove"] == "g" and rec["agent"] == "a"
    assert isinstance(rec["durationMs"], int) and "reason" not in rec
    deadline = time.monotonic() + 5
    while not [e for e in events.read(root) if e.get("event") == "Egress"]:
        assert time.monotonic() < deadline, "no Egress event"
        time.sleep(0.05)
    [ev] = [e for e in events.read(root) if e.get("event") == "Egress"]
    assert ev["bytesDown"] == len(payload) and ev["verdict"] == "allowed"


def test_client_data_sent_with_the_connect_reaches_upstream(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    with connect(sock_path(root)) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\nearly bytes".encode())
        s.shutdown(socket.SHUT_WR)
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 200") and rest + read_all(s) == b"early bytes"


def test_unlisted_endpoints_refused_and_recorded(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    for target in ("example.com:443", f"127.0.0.1:{echo + 1 if echo < 65535 else 1}",
                   f"localhost:{echo}", f"[::1]:{echo}", f"127.0.0.2:{echo}"):
        reply = ask(sock_path(root), f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert status(reply) == 403, reply
        body = reply.partition(b"\r\n\r\n")[2].decode()
        assert body.count("\n") == 1 and "not in the egress list of agent g/a" in body
        assert egress.format_endpoint(*egress.parse_endpoint(target)) in body
    refused = records(root, 5, verdict="refused")
    assert len(refused) == 5
    assert all(r["status"] == 403 and "not in the egress list" in r["reason"] for r in refused)


def test_plain_http_to_listed_loopback(root: Path, web: tuple[int, list[Any]]) -> None:
    port, seen = web
    start(root, {"a": [f"127.0.0.1:{port}"]})
    reply = ask(sock_path(root), (
        f"GET http://127.0.0.1:{port}/x/y?secret=hunter2 HTTP/1.1\r\n"
        f"Host: evil.example.com\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        f"Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nX-Keep: 1\r\n\r\n"
    ).encode())
    assert status(reply) == 200 and reply.endswith(b"hello /x/y?secret=hunter2")
    [(method, path, headers)] = seen
    assert (method, path) == ("GET", "/x/y?secret=hunter2")
    assert headers["Host"] == f"127.0.0.1:{port}"  # the request-line target, never Host
    assert headers["Connection"] == "close" and headers["X-Keep"] == "1"
    assert not any(k.lower().startswith("proxy-") for k in headers)
    [rec] = records(root, 1, verdict="allowed")
    assert rec["method"] == "GET" and rec["path"] == "/x/y" and rec["status"] == 200
    log = (egress.state_dir(root) / egress.LOG_NAME).read_text()
    assert "hunter2" not in log and "c2VjcmV0" not in log and "evil" not in log


def test_plain_http_body_is_forwarded(root: Path, web: tuple[int, list[Any]]) -> None:
    port, seen = web
    start(root, {"a": [f"localhost:{port}"]})
    reply = ask(sock_path(root), (f"POST http://localhost:{port}/p HTTP/1.1\r\n"
                                  f"Content-Length: 5\r\n\r\nabcde").encode())
    assert status(reply) == 200 and seen[0][:2] == ("POST", "/p")


def test_plain_http_to_a_remote_host_must_use_connect(root: Path) -> None:
    start(root, {"a": ["example.com:80", "example.com:443"]})
    reply = ask(sock_path(root), b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert status(reply) == 403 and b"use HTTPS (CONNECT)" in reply
    reply = ask(sock_path(root), b"GET https://example.com/ HTTP/1.1\r\n\r\n")
    assert status(reply) == 400


def test_upstream_down_is_a_502(root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        start(root, {"a": [f"127.0.0.1:{port}"]})
        reply = ask(sock_path(root), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == 502 and b"Connection refused" in reply
    [rec] = records(root, 1, status=502)
    assert rec["verdict"] == "allowed" and "refused" in rec["reason"]


def test_listed_name_resolving_to_loopback_is_refused(root: Path, echo: int) -> None:
    name = socket.gethostname().lower()
    try:
        addrs = {i[4][0] for i in socket.getaddrinfo(name, echo, type=socket.SOCK_STREAM)}
        egress.parse_endpoint(f"{name}:{echo}")
    except (OSError, ValueError):
        pytest.skip("this host's name does not resolve")
    if not addrs or not all(egress.is_loopback(str(a)) for a in addrs):
        pytest.skip(f"{name} does not resolve to loopback only here")
    start(root, {"a": [f"{name}:{echo}"]})
    reply = ask(sock_path(root), f"CONNECT {name}:{echo} HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == 403 and b"resolves to a loopback address" in reply


# --- identity ----------------------------------------------------------------------------


def test_identity_is_the_socket(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"], "b": []})
    connect_a = f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n"
    # b claims to be a in every way a client could: the socket decides
    claim = base64.b64encode(b"g/a:whatever").decode()
    reply = ask(sock_path(root, "b"), (connect_a + f"Proxy-Authorization: Basic {claim}\r\n"
                                       "X-Agent: a\r\n\r\n").encode())
    assert status(reply) == 403 and b"agent g/b" in reply
    with connect(sock_path(root, "a")) as s:
        s.sendall((connect_a + "\r\n").encode())
        assert read_head(s)[0].startswith(b"HTTP/1.1 200")
    assert records(root, 1, agent="b")[0]["verdict"] == "refused"
    assert records(root, 1, agent="a")[0]["verdict"] == "allowed"
    assert [r["agent"] for r in egress.read_log(root, agent="b")] == ["b"]
    assert egress.read_log(root, grove="other") == []


def test_reload_adds_and_removes_agents(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    assert not sock_path(root, "c").exists()
    egress.write_policy(root, "g", "c", [f"127.0.0.1:{echo}"])
    egress.ensure_running(root)  # a reload: the socket exists when it returns
    assert oct(sock_path(root, "c").stat().st_mode & 0o777) == "0o666"
    live = connect(sock_path(root, "c"))
    live.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
    assert read_head(live)[0].startswith(b"HTTP/1.1 200")
    egress.remove_policy(root, "g", "c")
    assert not sock_path(root, "c").exists()
    with live:  # its live tunnel ends with its policy
        assert read_all(live) == b""
    with pytest.raises(OSError):
        connect(sock_path(root, "c"))
    assert records(root, 1, agent="c")[0]["reason"] == "agent's egress policy removed"
    # an allow list that shrinks ends tunnels to the endpoint it lost
    live = connect(sock_path(root, "a"))
    live.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
    assert read_head(live)[0].startswith(b"HTTP/1.1 200")
    egress.write_policy(root, "g", "a", [])
    egress.ensure_running(root)
    with live:
        assert read_all(live) == b""


def test_policy_change_is_picked_up_without_a_reload(root: Path, echo: int) -> None:
    start(root, {"a": []})
    egress.write_policy(root, "g", "d", [f"127.0.0.1:{echo}"])
    deadline = time.monotonic() + 5
    while not sock_path(root, "d").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_broken_policy_is_reported_and_not_served(root: Path) -> None:
    start(root, {"a": []})
    bad = egress.policy_path(root, "g", "x")
    bad.write_text('{"grove": "g", "agent": "x", "allow": ["http://a:1"]}')
    with pytest.raises(EngineError, match=r"policy g/x\.json: invalid endpoint"):
        egress.ensure_running(root)
    assert not sock_path(root, "x").exists()
    bad.write_text('{"grove": "g", "agent": "other", "allow": []}')
    with pytest.raises(EngineError, match="do not match"):
        egress.ensure_running(root)
    bad.unlink()
    egress.ensure_running(root)


# --- hostile clients ---------------------------------------------------------------------


@pytest.mark.parametrize(("data", "code"), [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
    (b"\x00\x00\x00\x00", 400),
    (b"get http://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),  # origin-form: not a proxy request
    (b"GET * HTTP/1.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/2.0\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\n\n", 400),  # bare LF
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET  http://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\n folded\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX : x\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST http://127.0.0.1:1/ HTTP/1.1\r\nContent-Length: 1\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET http://user:pw@127.0.0.1:1/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1:1/#frag HTTP/1.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1%2e:1/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://[::1%25lo]:1/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://0x7f.0.0.1:1/ HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT user@127.0.0.1:1 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT http://127.0.0.1:1 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT *.example.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 127.0.0.1:1/x HTTP/1.1\r\n\r\n", 400),
    (b"TRACE http://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 405),
    (b"BREW http://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 405),
    (b"GET http://127.0.0.1:1/" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX: " + b"y" * 17000 + b"\r\n\r\n", 431),
])
def test_hostile_requests_get_a_status_not_a_hang(root: Path, data: bytes, code: int) -> None:
    start(root, {"a": ["127.0.0.1:1"]})
    t0 = time.monotonic()
    reply = ask(sock_path(root), data)
    assert status(reply) == code, reply
    assert time.monotonic() - t0 < 0.9  # at once, not after the head timeout
    assert reply.count(b"\r\n\r\n") == 1 and reply.endswith(b"\n")
    [rec] = records(root, 1)
    assert rec["verdict"] == "refused" and rec["status"] == code and rec["reason"]
    assert egress._ping(egress.state_dir(root))


def test_slow_head_gets_408_within_the_timeout(root: Path) -> None:
    start(root, {"a": []})  # ENGINE_EGRESS_HEAD_TIMEOUT=1 (the root fixture)
    with connect(sock_path(root)) as s:
        t0 = time.monotonic()
        s.sendall(b"CONNECT exam")
        for _ in range(3):  # slowloris: a byte now and then never extends the deadline
            time.sleep(0.2)
            s.sendall(b"p")
        reply = read_all(s)
        took = time.monotonic() - t0
    assert status(reply) == 408 and 0.9 < took < 2.5


def test_silent_and_vanishing_clients(root: Path) -> None:
    start(root, {"a": []})
    for _ in range(20):
        with connect(sock_path(root)):
            pass  # connect and close at once
    with connect(sock_path(root)) as s:
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n")
        s.shutdown(socket.SHUT_WR)  # half-open: the head can never end
        assert status(read_all(s)) == 400
    with connect(sock_path(root)) as s:
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    assert egress._ping(egress.state_dir(root))
    assert len(records(root, 22)) == 22
    assert "Traceback" not in (egress.state_dir(root) / "gateway.log").read_text()


def test_per_agent_connection_limit(root: Path, echo: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_EGRESS_MAX_CONNS", "40")
    start(root, {"a": [f"127.0.0.1:{echo}"], "b": [f"127.0.0.1:{echo}"]})
    held = []
    try:
        for _ in range(40):
            s = connect(sock_path(root))
            held.append(s)
            s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        for s in held:
            assert read_head(s)[0].startswith(b"HTTP/1.1 200")
        reply = ask(sock_path(root), f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        assert status(reply) == 503 and b"more than 40 connections" in reply
        # another agent is not starved by this one
        with connect(sock_path(root, "b")) as s:
            s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\nping".encode())
            s.shutdown(socket.SHUT_WR)
            assert read_head(s)[1] + read_all(s) == b"ping"
        for i, s in enumerate(held):  # every held tunnel still works
            s.sendall(b"%d" % i)
            s.shutdown(socket.SHUT_WR)
            assert read_all(s) == b"%d" % i
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5  # their slots come back as their records are written
    while len(records(root, 40, agent="a", verdict="allowed")) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with connect(sock_path(root)) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        assert read_head(s)[0].startswith(b"HTTP/1.1 200")


def test_many_concurrent_connections(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    results: list[bytes] = []

    def one(i: int) -> None:
        with connect(sock_path(root)) as s:
            s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\nn{i}".encode())
            s.shutdown(socket.SHUT_WR)
            _, rest = read_head(s)
            results.append(rest + read_all(s))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(250)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(b"n%d" % i for i in range(250))
    assert len(records(root, 250, verdict="allowed")) == 250


def test_a_flood_of_silent_connections_is_bounded(root: Path, echo: int) -> None:
    """800 connections that never send a byte: 256 wait for their head (then 408), the
    rest are refused at once (503); the gateway and the other agents go on."""
    start(root, {"a": [], "b": [f"127.0.0.1:{echo}"]})
    flood = []
    try:
        for _ in range(800):
            flood.append(connect(sock_path(root)))
        assert egress._ping(egress.state_dir(root))
        with connect(sock_path(root, "b")) as s:
            s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\nok".encode())
            s.shutdown(socket.SHUT_WR)
            assert read_head(s)[1] + read_all(s) == b"ok"
        codes = [status(read_all(s)) for s in flood]
    finally:
        for s in flood:
            s.close()
    assert codes.count(408) == 256 and codes.count(503) == 544


def test_idle_tunnel_is_closed(root: Path, echo: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_EGRESS_IDLE_TIMEOUT", "0.5")
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    with connect(sock_path(root)) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        assert read_head(s)[0].startswith(b"HTTP/1.1 200")
        s.sendall(b"x")
        t0 = time.monotonic()
        assert read_all(s) == b"x"
        assert 0.3 < time.monotonic() - t0 < 3
    assert records(root, 1)[0]["reason"] == "idle for 0.5 s"


# --- the gateway's life ------------------------------------------------------------------


def test_two_concurrent_starts_make_one_gateway(root: Path) -> None:
    egress.write_policy(root, "g", "a", [])
    code = ("import sys; from pathlib import Path; from engine import egress; "
            "egress.ensure_running(Path(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    pid = gateway_pid(root)
    gateways = [d for d in os.listdir("/proc") if d.isdigit() and _is_gateway(int(d), root)]
    assert gateways == [str(pid)]


def _is_gateway(pid: int, root: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"engine.egress.gateway" in cmd and str(root).encode() in cmd and state != "Z"


def test_gateway_exits_when_its_state_dir_is_removed(root: Path) -> None:
    start(root, {"a": []})
    pid = gateway_pid(root)
    shutil.rmtree(egress.state_dir(root))
    assert gone(pid, 5)
    assert not (root / ".engine" / "egress").exists()  # nothing recreated


def test_gateway_exits_without_policies(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_EGRESS_IDLE_EXIT", "0.5")
    start(root, {"a": []})
    pid = gateway_pid(root)
    time.sleep(1)
    assert not gone(pid, 0)  # a policy: it stays
    egress.remove_policy(root, "g", "a")
    assert gone(pid, 5)
    state = egress.state_dir(root)
    assert not (state / "control.sock").exists() and not (state / "gateway.pid").exists()


def test_sigterm_lets_tunnels_end_then_exits_0(root: Path, echo: int) -> None:
    start(root, {"a": [f"127.0.0.1:{echo}"]})
    proc = next(p for p in egress._children if p.pid == gateway_pid(root))
    with connect(sock_path(root)) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        assert read_head(s)[0].startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        s.sendall(b"still here")
        assert s.recv(100) == b"still here"  # the tunnel lives on for a moment
        assert proc.wait(10) == 0
        assert 1.5 < time.monotonic() - t0 < 6
    state = egress.state_dir(root)
    assert not (state / "control.sock").exists() and not (state / "gateway.pid").exists()
    assert not sock_path(root).exists()
    assert records(root, 1)[0]["bytesDown"] == 10


def test_a_gateway_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "r"
    state = egress.state_dir(root)
    state.mkdir(parents=True)
    (state / "control.sock").mkdir()  # in the way: it cannot bind
    with pytest.raises(EngineError) as e:
        egress.ensure_running(root, timeout=5)
    assert "egress gateway did not start" in str(e.value) and "\n" not in str(e.value)


# --- remote agents: TCP and Proxy-Authorization -------------------------------------------


def start_tcp_gateway(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A gateway for `root` with a TCP listener on a free loopback port, as in a cluster,
    once it answers: (process, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (egress.state_dir(root) / "gateway.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "engine.egress.gateway", "--root",
                             str(root), "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 10
    while not egress._ping(egress.state_dir(root)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc, port


def test_tcp_listener_identifies_agents_by_token(root: Path, echo: int) -> None:
    egress.write_policy(root, "g", "a", [f"127.0.0.1:{echo}"], token="s3cret-token")
    egress.write_policy(root, "g", "n", [f"127.0.0.1:{echo}"])  # no token: never by TCP
    proc, port = start_tcp_gateway(root)
    try:

        def tunnel(credentials: str | None) -> bytes:
            auth = "" if credentials is None else (
                f"Proxy-Authorization: Basic "
                f"{base64.b64encode(credentials.encode()).decode()}\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n{auth}\r\nhi".encode())
                s.shutdown(socket.SHUT_WR)
                return read_all(s)

        assert tunnel("g/a:s3cret-token").endswith(b"\r\n\r\nhi")
        for bad in (None, "g/a:wrong", "g/a:", "g/n:", "g/n:x", "g/zz:s3cret-token",
                    "../a:s3cret-token", "garbage"):
            reply = tunnel(bad)
            assert status(reply) == 407, (bad, reply)
            assert b'Proxy-Authenticate: Basic realm="engine-egress"' in reply
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nProxy-Authorization: Basic !!\r\n\r\n")
            assert status(read_all(s)) == 407
        allowed = records(root, 1, verdict="allowed")
        assert allowed[0]["agent"] == "a" and allowed[0]["bytesUp"] == 2
        assert len(records(root, 9, status=407)) == 9
        log_text = (egress.state_dir(root) / egress.LOG_NAME).read_text()
        assert "s3cret" not in log_text
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# --- the forwarder -----------------------------------------------------------------------


def _python_for_container() -> str:
    return sys.executable  # 3.11, run with -S as in the image; no engine on its path


def test_forwarder_proxy_port_on_the_host(root: Path, web: tuple[int, list[Any]]) -> None:
    port, _ = web
    start(root, {"a": [f"127.0.0.1:{port}"]})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        proxy = probe.getsockname()[1]
    ready = root / "ready"
    fw = subprocess.Popen([_python_for_container(), "-S", str(FORWARDER), "--socket",
                           str(sock_path(root)), "--proxy-port", str(proxy), "--ready",
                           str(ready), "--forward", "example.com:80", "--forward", "junk"],
                          stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert fw.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
            s.sendall(f"GET http://127.0.0.1:{port}/via HTTP/1.1\r\n\r\n".encode())
            assert read_all(s).endswith(b"hello /via")
        for garbage in (b"\x00" * 100, b"", b"CONNECT 10.0.0.1:22 HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
                s.sendall(garbage)
                s.shutdown(socket.SHUT_WR)
                read_all(s)
        with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
            s.sendall(f"GET http://127.0.0.1:{port}/after HTTP/1.1\r\n\r\n".encode())
            assert read_all(s).endswith(b"hello /after")
        replies: list[bytes] = []

        def one(i: int) -> None:
            with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
                s.sendall(f"GET http://127.0.0.1:{port}/{i} HTTP/1.1\r\n\r\n".encode())
                replies.append(read_all(s).rpartition(b"\r\n\r\n")[2])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(replies) == sorted(b"hello /%d" % i for i in range(100))
        assert fw.poll() is None
    finally:
        fw.terminate()
        _, err = fw.communicate(timeout=10)
    assert "example.com:80" in err and "not a loopback endpoint" in err
    assert "Traceback" not in err


def _netns() -> list[str]:
    """The unshare command line for a fresh network namespace (and a pid namespace, so
    that nothing started in it outlives the test), or skip saying why there is none."""
    if shutil.which("unshare") is None or shutil.which("curl") is None:
        pytest.skip("needs unshare and curl")
    for cmd in (["unshare", "--net", "--pid", "--fork", "--kill-child", "--map-root-user"],
                ["unshare", "--net", "--pid", "--fork", "--kill-child"]):
        if subprocess.run([*cmd, "true"], capture_output=True).returncode == 0:
            return cmd
    pytest.skip("cannot make a network namespace here (unshare --net refused)")


def test_forwarder_in_a_network_namespace(root: Path, web: tuple[int, list[Any]]) -> None:
    """As in a container without network: the forwarder brings lo up, listens on the
    listed loopback port and on 3128; curl reaches the host's upstream only through it."""
    unshare = _netns()
    port, seen = web
    start(root, {"a": [f"127.0.0.1:{port}"]})
    ready = root / "ready"
    script = f"""
set -u
{_python_for_container()} -S {FORWARDER} --socket {sock_path(root)} --proxy-port 3128 \\
    --forward 127.0.0.1:{port} --ready {ready} --lo-up >/dev/null 2>{root}/fw.err &
fw=$!
for i in $(seq 1 200); do [ -e {ready} ] && break; sleep 0.05; done
echo "direct:$(curl -s --max-time 10 http://127.0.0.1:{port}/direct)"
echo "connect:$(curl -s --max-time 10 -p -x http://127.0.0.1:3128 http://127.0.0.1:{port}/tun)"
echo "plain:$(curl -s --max-time 10 -x http://127.0.0.1:3128 http://127.0.0.1:{port}/plain)"
HTTPS_PROXY=http://127.0.0.1:3128 curl -s --max-time 10 https://example.com/ >/dev/null
echo "refused:$?"
echo "after:$(curl -s --max-time 10 http://127.0.0.1:{port}/after)"
kill $fw; wait $fw
"""
    out = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                         timeout=60)
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert lines.get("direct") == "hello /direct", out
    assert lines.get("connect") == "hello /tun", out
    assert lines.get("plain") == "hello /plain", out
    assert lines.get("refused") not in (None, "0"), out
    assert lines.get("after") == "hello /after", out
    assert [p for _, p, _ in seen] == ["/direct", "/tun", "/plain", "/after"]
    recs = records(root, 5)
    assert [r["verdict"] for r in recs].count("refused") == 1
    assert any(r["target"] == "example.com:443" and r["status"] == 403 for r in recs)
    err = (root / "fw.err").read_text()
    assert "Traceback" not in err


def test_forwarder_forward_port_refused_by_the_gateway_closes_the_client(
        root: Path, web: tuple[int, list[Any]]) -> None:
    unshare = _netns()
    port, _ = web
    start(root, {"a": []})  # the forward is set up but the agent's list is empty
    ready = root / "ready"
    script = f"""
{_python_for_container()} -S {FORWARDER} --socket {sock_path(root)} --proxy-port 3128 \\
    --forward 127.0.0.1:{port} --ready {ready} --lo-up >/dev/null 2>{root}/fw.err &
fw=$!
for i in $(seq 1 200); do [ -e {ready} ] && break; sleep 0.05; done
curl -s --max-time 10 http://127.0.0.1:{port}/x; echo "code:$?"
kill $fw; wait $fw
"""
    out = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert re.search(r"code:(52|56)", out.stdout), out  # empty reply / connection reset
    err = (root / "fw.err").read_text()
    assert "403" in err and "not in the egress list" in err and err.count("\n") == 1


@pytest.mark.parametrize(("addr", "local"), [
    ("127.0.0.1", True), ("::1", True), ("0.0.0.0", True), ("::", True),
    ("169.254.169.254", True), ("::ffff:169.254.169.254", True), ("fe80::1%eth0", True),
    ("224.0.0.1", True), ("ff02::1", True),
    ("10.0.0.5", False), ("192.0.2.10", False), ("2001:db8::10", False), ("not-an-ip", False)])
def test_a_listed_name_never_leads_to_a_local_or_link_local_address(addr: str,
                                                                     local: bool) -> None:
    """What a listed name's resolution is filtered by: the metadata service (link-local) is
    as far out of a name's reach as this host."""
    from engine.egress import gateway
    assert gateway._local_address(addr) is local
