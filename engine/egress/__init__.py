"""The egress gateway's client side: where its files live, the endpoint grammar, the
policy files the runtimes write, and starting/stopping the one gateway of a repository.

The Docker runtime calls `write_policy` then `ensure_running` before it creates an agent
with `network: egress`, mounts `socket_dir(...)` at `CONTAINER_DIR`, and calls
`remove_policy` when the agent is deleted. The gateway itself (`engine.egress.gateway`,
asyncio) is imported only by its own process; this module stays cheap to import.

State directory `<root>/.engine/egress/` (0700):
    control.sock           the gateway's control socket (0600): ping, reload, stop
    gateway.pid / .log     its pid, its stderr
    agents/<g>/<a>.json    one policy per agent: {"grove", "agent", "allow", ["token"]}
    sock/<g>/<a>/gw.sock   the agent's socket (its identity), mounted into its container
    log.jsonl[.1]          one record per connection (rotated at 32 MiB)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import paths
from engine.errors import EngineError
from engine.fsutil import atomic_write, flock

SOCKET_NAME = "gw.sock"
CONTAINER_DIR = "/run/engine/egress"
PROXY_PORT = 3128
LOG_NAME = "log.jsonl"

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,5}", re.ASCII)
_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}", re.ASCII)
_IPV6 = re.compile(r"[0-9a-f:.]{2,45}", re.ASCII)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", re.ASCII)
_CONTROL_REPLY_MAX = 4096


def state_dir(root: Path) -> Path:
    return paths.state(root) / "egress"


def socket_dir(root: Path, grove: str, agent: str) -> Path:
    """The directory mounted read-only at CONTAINER_DIR in the agent's container."""
    return state_dir(root) / "sock" / grove / agent


def policy_path(root: Path, grove: str, agent: str) -> Path:
    return state_dir(root) / "agents" / grove / f"{agent}.json"


def check_name(kind: str, name: str) -> str:
    """A grove or agent name safe as one path component; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid {kind} name {name!r:.80}")
    return name


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` -> (host, port), normalized; ValueError (one line) for anything else.

    host: a DNS name (lowercased), an IPv4 dotted quad, or `[ipv6]` (returned without
    brackets, compressed). No scheme, path, userinfo, wildcard, percent-encoding or zone.
    """
    if not isinstance(text, str) or not text.isascii() or len(text) > 300:
        raise ValueError(f"invalid endpoint {text!r:.80}: expected host:port")
    shown = repr(text)[:80]
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"invalid endpoint {shown}: expected host:port")
    if not _DIGITS.fullmatch(port_text) or port_text.startswith("0"):
        raise ValueError(f"invalid endpoint {shown}: port must be a number 1-65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid endpoint {shown}: port must be a number 1-65535")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1].lower()
        if not _IPV6.fullmatch(inner):
            raise ValueError(f"invalid endpoint {shown}: bad IPv6 address")
        try:
            return str(ipaddress.IPv6Address(inner)), port
        except ValueError:
            raise ValueError(f"invalid endpoint {shown}: bad IPv6 address") from None
    host = host.lower()  # ASCII only (checked above): no Unicode case folding
    labels = host.split(".")
    if labels[-1].isdigit():  # an IPv4 address, or an attempt at one: dotted quad only
        if not _QUAD.fullmatch(host) or any(int(p) > 255 for p in labels):
            raise ValueError(f"invalid endpoint {shown}: bad IPv4 address "
                             f"(dotted quad expected)")
        return host, port
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"invalid endpoint {shown}: bad host name")
    return host, port


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as IPv4-mapped), "localhost"."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def write_policy(root: Path, grove: str, agent: str, allow: list[str],
                 token: str | None = None) -> Path:
    """Write the agent's allow list (normalized, deduplicated) and make its socket dir;
    the gateway serves it at its next reload (`ensure_running`) or scan (2 s)."""
    check_name("grove", grove)
    check_name("agent", agent)
    try:
        endpoints = sorted({format_endpoint(*parse_endpoint(e)) for e in allow})
    except ValueError as e:
        raise EngineError(f"agent {grove}/{agent}: egress: {e}") from None
    doc: dict[str, Any] = {"grove": grove, "agent": agent, "allow": endpoints}
    if token is not None:
        doc["token"] = token
    state = _make_state(root)
    for d in (state / "agents", state / "agents" / grove):
        d.mkdir(mode=0o700, exist_ok=True)
    path = policy_path(root, grove, agent)
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    sock = socket_dir(root, grove, agent)
    for d in (state / "sock", sock.parent, sock):
        d.mkdir(mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    return path


def remove_policy(root: Path, grove: str, agent: str) -> None:
    """Forget the agent: its policy file and socket dir; a running gateway is told."""
    check_name("grove", grove)
    check_name("agent", agent)
    with contextlib.suppress(FileNotFoundError):
        policy_path(root, grove, agent).unlink()
    shutil.rmtree(socket_dir(root, grove, agent), ignore_errors=True)
    state = state_dir(root)
    if (state / "control.sock").exists():
        with contextlib.suppress(OSError):
            _request(state, "reload", 5.0)


def ensure_running(root: Path, timeout: float = 10.0) -> None:
    """Make the repository's gateway serve every policy written so far: reload it if it
    answers, else start it (detached, one per root: `start.lock`) and then reload."""
    root = root.resolve()  # the gateway runs elsewhere: it needs the absolute root
    state = _make_state(root)
    with flock(state / "start.lock"):
        if _ping(state):
            _reload(state, timeout)
            return
        proc = _spawn(root, state)
        deadline = time.monotonic() + timeout
        while not _ping(state):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                raise EngineError(f"egress gateway did not start: {_last_log_line(state)}")
            time.sleep(0.02)
        _reload(state, timeout)


def stop(root: Path, timeout: float = 5.0) -> None:
    """Ask the gateway to exit and wait until it has (its control socket is gone, and the
    process too if this process started it)."""
    state = state_dir(root)
    try:
        pid = int((state / "gateway.pid").read_text())
    except (OSError, ValueError):
        pid = 0
    try:
        _request(state, "stop", timeout)
    except OSError:
        _reap()
        return
    deadline = time.monotonic() + timeout
    for proc in _children:
        if proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    while (state / "control.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    _reap()


def read_log(root: Path, grove: str | None = None,
             agent: str | None = None) -> list[dict[str, Any]]:
    """The gateway's connection records, oldest first (the rotated file, then the current
    one), optionally only those of one grove and/or agent."""
    state = state_dir(root)
    out: list[dict[str, Any]] = []
    for name in (LOG_NAME + ".1", LOG_NAME):
        try:
            text = (state / name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if grove is not None and rec.get("grove") != grove:
                continue
            if agent is not None and rec.get("agent") != agent:
                continue
            out.append(rec)
    return out


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A name for `path` a Unix socket address can hold (108 bytes): the path itself, or
    /proc/self/fd/N/<name> through a descriptor of its directory."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _make_state(root: Path) -> Path:
    state = state_dir(root)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.mkdir(mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    return state


def _request(state: Path, command: str, timeout: float) -> str:
    """One control command; its reply line (without the newline). OSError if no gateway."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        with short_path(state / "control.sock") as addr:
            s.connect(addr)
        s.sendall(command.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < _CONTROL_REPLY_MAX:
            chunk = s.recv(_CONTROL_REPLY_MAX)
            if not chunk:
                break
            reply += chunk
    return reply.decode(errors="replace").strip()


def _ping(state: Path) -> bool:
    try:
        return _request(state, "ping", 2.0) == "ok"
    except OSError:
        return False


def _reload(state: Path, timeout: float) -> None:
    try:
        reply = _request(state, "reload", timeout)
    except OSError as e:
        raise EngineError(f"egress gateway did not answer: {e}") from None
    if reply != "ok":
        raise EngineError(f"egress gateway: {_clean(reply) or 'no reply to reload'}")


_children: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    """Collect gateways this process started that have since exited (no zombies)."""
    _children[:] = [p for p in _children if p.poll() is None]


def _spawn(root: Path, state: Path) -> subprocess.Popen[bytes]:
    _reap()
    log = state / "gateway.log"
    with contextlib.suppress(OSError):
        if log.stat().st_size > 1 << 20:
            log.unlink()
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.egress.gateway", "--root", str(root)],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/", env=env,
            start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    _children.append(proc)
    return proc


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def _last_log_line(state: Path) -> str:
    try:
        with open(state / "gateway.log", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return _clean(lines[-1]) if lines else "no output (see .engine/egress/gateway.log)"
